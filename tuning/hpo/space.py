"""Search configs (`conf/search/<name>.yaml`): the Tune search space, budget and overrides.

A search config looks like

    num_samples: 20            # trials
    searcher: tpe              # or random (the baseline)
    startup_trials: 6          # TPE: random proposals before it models (default: a third of num_samples, 1-10)
    max_epochs: 60             # per trial (ASHA's max_t); becomes the experiment's train.epochs
    grace_period: 5            # epochs before ASHA may stop a trial
    reduction_factor: 2
    folds: 5                   # becomes the experiment's train.folds
    objectives: [macro_auc, balanced_accuracy]   # optional: several objectives (see SearchConfig)
    overrides: {}              # experiment config overrides (dotted keys), e.g. a tiny model
    dataset_overrides: {}      # per dataset name, applied after `overrides` (e.g. image sizes)
    space:                     # dotted experiment keys -> distribution
      loss.tau_sam: {dist: loguniform, low: 0.02, high: 0.5}

A search file may start from another with `extends: NAME` (conf/search/NAME.yaml): its keys are
merged over that file's.

Every value the space can sample is checked against the experiment at load (`check_space`): finite
bounds, each `choice` value as a value of its key. A `choice` may offer lists (a list-typed key
such as `model.mixer_stages: {dist: choice, values: [[4], [3, 4]]}`); Tune and Optuna carry those
as labels (`Param.to_tune`) and a trial decodes them (`SearchConfig.decode`).

The experiment's own values for the searched keys (the public code's settings) are the first
point Optuna evaluates. How these settings combine with the experiment file and the command line
is `tuning.hpo.run`'s job (one documented precedence).

The shipped spaces (conf/search/default.yaml; demo.yaml with ranges for its small model; smoke.yaml
only the fine stage's settings) reach what the comparisons found to matter (issue 24): the fine
stage off (`loss.fine: {dist: choice, values: [true, false]}`), `optim.lr`, `optim.weight_decay`,
`model.dropout`, `model.dim`, class balancing (`loss.class_weights`) and `train.modality_dropout` /
`train.field_dropout`, beside the fine stage's temperatures, momentum and term weights. The space
is flat: every trial samples every key, and with `loss.fine` false the fine-stage keys
(`loss.w_sam/w_up/w_cp`, `loss.tau_*`, `loss.momentum`) are sampled, recorded and unused
(`cfcml.losses.CFCMLLoss` adds no fine-stage term; training reports `train_sam/up/cp` as 0). A fine
stage switched off by its own choice, rather than by term weights that would have to reach 0
(`loguniform` cannot), is the simplest honest way to reach "cross-entropy only". A conditional
sub-space (the fine-stage keys sampled only when `loss.fine` is true) would need Optuna's
define-by-run space (`OptunaSearch(space=callable)`); Ray 2.60 with Optuna 5 supports it together
with `points_to_evaluate` (enqueued trials, checked), but it would change how the driver hands Tune
its `param_space` and what a trial's config holds. The flat space's cost: TPE models the fine-stage
keys from every trial, the fine-off ones included, where they had no effect (noise in that model,
not a wrong trial). docs/configuration.md, "The shipped spaces", lists every range and why.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cfcml.config import CONF_DIR, ConfigError, ExperimentConfig, from_dict, known_names, read_config
from cfcml.evaluation import metric_keys

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# what Optuna's categorical distribution holds (and compares by ==): anything else is carried as a label
_PLAIN = (type(None), bool, int, float, str)
_ACC_CLASS = re.compile(r"acc_class_\d+")


def _objective_names() -> tuple[str, ...]:
    """What a search file's `objectives` may name: a metric of either task, or a minimised
    validation figure (imported here: a trial actor unpickles this module and must not load sklearn)."""
    from cfcml.evaluation.metrics import metric_names

    return tuple(dict.fromkeys((*metric_names("binary", 2), *metric_names("multiclass", 0), *metric_keys.MINIMISED)))


def _known_objective(name: object) -> bool:
    return isinstance(name, str) and (name in _objective_names() or _ACC_CLASS.fullmatch(name) is not None)


@dataclass(frozen=True)
class Param:
    """One searched key. A `choice`'s `values` are the config's own typed values once loaded (a
    list as a tuple, "5e-4" as 0.0005: `typed`)."""

    key: str  # dotted experiment key, also the Tune parameter name
    dist: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    @property
    def range(self) -> tuple[float, float]:
        """(low, high) of a numeric dist (loguniform, uniform, int): `parse_param` sets both for those."""
        assert self.low is not None and self.high is not None, f"{self.key}: dist {self.dist} has no low and high"
        return self.low, self.high

    @property
    def labelled(self) -> bool:
        """Whether Tune and Optuna carry this choice's values as labels: a choice with a value that
        is not None, a bool, a number or a string (a list, for a list-typed key such as
        model.mixer_stages). Optuna's categorical distribution holds those plain values only,
        and matches them by ==, which a list never equals its tuple (Optuna refused the first
        point, the experiment's own `(4,)`, as "not in ([4], [3, 4])")."""
        return self.dist == "choice" and not all(isinstance(v, _PLAIN) for v in self.values)

    def to_tune(self, value: Any) -> Any:
        """`value` (a config value of this key) as Tune and Optuna carry it: its JSON text for a
        labelled choice (`(3, 4)` and `[3, 4]` both as "[3, 4]"), else itself."""
        if not self.labelled:
            return value
        return json.dumps(list(value) if isinstance(value, tuple) else value)

    def from_tune(self, value: Any) -> Any:
        """The config value of what Tune hands a trial (`to_tune`'s inverse); a value that is not
        one of this choice's labels is returned as it is, for the config to judge."""
        if not self.labelled or not isinstance(value, str):
            return value
        return {self.to_tune(v): v for v in self.values}.get(value, value)

    def tune_domain(self) -> Any:
        from ray import tune

        if self.dist == "loguniform":
            return tune.loguniform(*self.range)
        if self.dist == "uniform":
            return tune.uniform(*self.range)
        if self.dist == "int":
            low, high = self.range
            return tune.randint(int(low), int(high) + 1)
        return tune.choice([self.to_tune(v) for v in self.values])

    def typed(self, base: ExperimentConfig) -> Param:
        """A choice with each value as `base`'s config holds it (lists as tuples, numbers written
        as strings as floats), so that values compare equal to the config's; ConfigError for a
        value that is not a valid value of the key (`check_space` names it first)."""
        if self.dist != "choice":
            return self
        return dataclasses.replace(self, values=tuple(base.replace({self.key: v}).value(self.key)
                                                      for v in self.values))

    def bounds(self) -> list[tuple[str, Any]]:
        """(name, value) of every extreme the search can sample: low and high (Optuna may return
        the high bound itself; whole numbers for dist: int), or every choice."""
        if self.dist == "choice":
            return [(f"values[{i}]", v) for i, v in enumerate(self.values)]
        low, high = self.range
        if self.dist == "int":
            return [("low", int(low)), ("high", int(high))]
        return [("low", low), ("high", high)]


@dataclass(frozen=True)
class SearchConfig:
    """One search file. Args:
        num_samples: trials, >= 1.
        max_epochs: epochs per trial (None: the experiment's train.epochs).
        grace_period: epochs before ASHA may stop a trial, >= 1.
        reduction_factor: ASHA keeps 1 / reduction_factor of the trials at each rung, >= 2 is usual.
        folds: cross-validation folds (None: the experiment's train.folds).
        overrides: experiment overrides (dotted keys) for every dataset.
        dataset_overrides: per dataset name, more overrides applied after `overrides`.
        space: the searched keys (filled from the file's `space:` mapping).
        searcher: "tpe" (Optuna's TPE, the default) or "random" (Optuna's random sampler, the
            baseline benchmarks/bench_search.py measures TPE against); ASHA stops trials either way.
        startup_trials: how many trials TPE proposes at random before it fits its model, >= 1
            (the published defaults, evaluated first, count as one). None: a third of
            `num_samples`, between 1 and 10. Optuna's own default is 10, which would leave a
            search of 10 trials or fewer (the smoke and demo searches) a random search.
        objectives: validation metric names to optimise together ("macro_auc", "balanced_accuracy",
            "acc_class_2", ... of `cfcml.evaluation.metrics.metric_names`, maximised; "brier" or
            "loss", the validation Brier score and NLL, minimised: `metric_keys.objective_mode`),
            no name twice. The first is the primary objective: it becomes `train.selection_metric`
            (it picks each trial's epoch, the highest value: so it must be a maximised one) and ASHA
            stops trials on it alone. Two or more: Optuna's multi-objective sampler gets every
            objective's value at the trial's selected epoch, and the search retrains the Pareto
            front's point that `tuning.records.outcome.FRONT_RULE` picks. Empty or one name: a
            search on one metric, exactly as without the key.
        bought_seeds: what tuning bought (docs/evaluation.md): after the final model, the published
            defaults and the chosen configuration are trained on this many fresh seeds and compared
            on the test split (paired differences with CIs); 0 (the default) = off, >= 0.
            `search.py --bought-seeds N` overrides it.
    """

    name: str = ""
    num_samples: int = 20
    max_epochs: int | None = None
    grace_period: int = 5
    reduction_factor: int = 2
    folds: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset_overrides: dict[str, Any] = field(default_factory=dict)
    space: tuple[Param, ...] = ()
    searcher: Literal["tpe", "random"] = "tpe"
    startup_trials: int | None = None
    objectives: tuple[str, ...] = ()
    bought_seeds: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bought_seeds, int) or isinstance(self.bought_seeds, bool) or self.bought_seeds < 0:
            raise ConfigError(f"expected 0 (off) or a positive number of seeds, got {self.bought_seeds!r}",
                              "bought_seeds")
        for key in ("num_samples", "max_epochs", "grace_period", "reduction_factor", "folds", "startup_trials"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"expected a positive integer, got {value!r}", key)
        for i, name in enumerate(self.objectives):
            if not _known_objective(name):
                raise ConfigError(f"{name!r} is not a validation metric (known: {', '.join(_objective_names())}, "
                                  f"acc_class_<k>)", f"objectives[{i}]")
            if name in self.objectives[:i]:
                raise ConfigError(f"{name!r} is named twice", f"objectives[{i}]")
        if self.objectives and metric_keys.objective_mode(self.objectives[0]) != "max":
            raise ConfigError(f"{self.objectives[0]!r} is minimised, but the primary (first) objective picks each "
                              f"trial's epoch as the highest; name it after a maximised metric", "objectives[0]")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def for_dataset(self, dataset: str) -> dict[str, Any]:
        """`overrides` with the dataset's own `dataset_overrides` on top."""
        mine = self.dataset_overrides.get(dataset) or {}
        if not isinstance(mine, dict):
            raise ConfigError(f"dataset_overrides.{dataset}: expected a mapping")
        return {**self.overrides, **mine}

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.space]

    def param_space(self) -> dict[str, Any]:
        """The Tuner's `param_space`: every searched key's Tune domain (`Param.tune_domain`)."""
        return {p.key: p.tune_domain() for p in self.space}

    def decode(self, config: dict[str, Any]) -> dict[str, Any]:
        """What Tune hands a trial (dotted keys) as experiment overrides: each searched key's
        value as the config holds it (`Param.from_tune`); other keys as they are."""
        params = {p.key: p for p in self.space}
        return {k: params[k].from_tune(v) if k in params else v for k, v in config.items()}

    def tpe_startup_trials(self, num_samples: int) -> int:
        """Random proposals before TPE models the results, for a search of `num_samples` trials
        (`--num-samples` may differ from the file's); see `startup_trials`."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(1, min(10, num_samples // 3))


def _param(key: str, raw: Any, where: str, base: ExperimentConfig) -> Param:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{dist: loguniform, low: .., high: ..}}")
    unknown = set(raw) - {"dist", "low", "high", "values"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    dist = raw.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}.dist: expected one of {list(DISTRIBUTIONS)}, got {dist!r}")
    try:  # the key must name a real experiment field
        base.value(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if dist == "choice":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values: a non-empty list is required for dist: choice")
        param = Param(key, dist, values=tuple(values))
    else:
        try:
            low, high = float(raw["low"]), float(raw["high"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: numeric low and high are required for dist: {dist}") from None
        for name, value in (("low", low), ("high", high)):
            if not math.isfinite(value):  # nan, .inf, -.inf, "nan", 1e999: no distribution samples them
                raise ConfigError(f"{where}.{name}: expected a finite number, got {raw[name]!r}")
        if not low < high or (dist == "loguniform" and low <= 0):
            raise ConfigError(f"{where}: need 0 < low < high for loguniform, low < high otherwise")
        if dist == "int" and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: dist: int needs whole-number low and high, "
                              f"got {raw['low']!r}, {raw['high']!r}")
        param = Param(key, dist, low, high)
    return param


def check_space(space: tuple[Param, ...], base: ExperimentConfig, where: str) -> None:
    """Every value the search can sample makes `base` a valid experiment: each key's bounds (or
    choices) with the other keys at `base`'s values, then every searched key at its low bound
    together and at its high bound together (the config's cross-key checks). ConfigError naming
    `where`, the key and the bound. Raised at load and again once the command line is applied."""
    for param in space:
        for bound, value in param.bounds():
            try:
                base.replace({param.key: value})
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"{where} space.{param.key}.{bound}: {value!r} can be sampled but is not a "
                                  f"valid {param.key}: {exc}") from None
    numeric = [p for p in space if p.dist != "choice"]
    for bound in ("low", "high"):
        values = {p.key: dict(p.bounds())[bound] for p in numeric}
        if len(values) < 2:
            continue
        try:
            base.replace(values)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where} space: the searched keys at their {bound} bounds together "
                              f"({values}) are not a valid experiment: {exc}") from None


def search_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_DIR / "search" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown search {name_or_path!r}: no {path} (known: {known_names('search')})")
    return path


def load_search(name_or_path: str, base: ExperimentConfig) -> SearchConfig:
    """Load and validate a search file against the experiment it will tune; `overrides` of the
    result already hold the dataset's own `dataset_overrides`."""
    path = search_path(name_or_path)
    raw = read_config(path)
    where = f"{path}:"
    space_raw = raw.pop("space", None) or {}
    if "name" in raw:
        raise ConfigError(f"{where} name: unknown key (the file name is the search's name)")
    cfg = from_dict(SearchConfig, {**raw, "name": path.stem}, where)
    try:
        overrides = cfg.for_dataset(base.dataset)
        with_overrides = base.replace(overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where} overrides: {exc}") from None
    return dataclasses.replace(cfg, overrides=overrides, space=parse_space(space_raw, with_overrides, where))


def parse_space(raw: Any, base: ExperimentConfig, where: str) -> tuple[Param, ...]:
    """A search space as a search file's `space:` mapping writes it (dotted keys -> distributions),
    validated against the experiment `base` it will vary (`check_space`) and typed (`Param.typed`).

    Args:
        raw: {key: {dist, low, high} or {dist: choice, values}}, e.g. a search file's `space:` or a
            comparison variant's own space (`tuning.evidence.comparison.VARIANT_SPACES`).
        base: the experiment every sampled value must keep valid.
        where: what the ConfigError names first (a file, a variant).

    Raises:
        ConfigError: naming `where`, the key and the bad bound or value.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} space: expected a mapping of dotted keys to distributions")
    space = tuple(_param(k, v, f"{where} space.{k}", base) for k, v in raw.items())
    check_space(space, base, where)
    return tuple(p.typed(base) for p in space)


def initial_point(search: SearchConfig, cfg: ExperimentConfig) -> dict[str, Any]:
    """The first point Optuna evaluates, as Tune carries it (`Param.to_tune`): the experiment's
    own values of the searched keys, except a `choice` key whose experiment value is not among its
    values, which takes its first value (Optuna cannot evaluate a choice it does not have)."""
    point = {}
    for p in search.space:
        value = cfg.value(p.key)
        if p.dist == "choice" and value not in p.values:
            value = p.values[0]
        point[p.key] = p.to_tune(value)
    return point
