"""What a configuration buys: CFCML against its published defaults, its ablations and baselines.

Every variant trains on the same folds, with the same seeds and the same epoch budget, as Ray Tune
trials (one per variant and seed, as many at once as the cluster holds; each a Ray Train run like a
search trial). Nothing is selected: every model is taken at the end of its budget.

- CV: each trial's mean validation metric over folds at its last epoch (`cv_*`), then the mean
  and standard deviation over seeds;
- test: the fold ensemble (the K fold models of every seed, K x S models, probabilities averaged)
  predicts the held-out test split once per variant, after training; bootstrap 95% CIs over
  patients, and the paired bootstrap difference of the AUC against `cfcml` (both variants scored
  on the same resampled patients).

Variants (docs/evaluation.md): `cfcml` (the experiment file's settings, the published defaults),
`cfcml_tuned` (the searched values of a finished search's best trial on this comparison's model
and budget), the ablations `no_mg`, `no_cie`, `no_fine` (one part of CFCML removed each), and the
baselines `image_only`, `tabular_only`, `late_concat` and the established fusion methods
`early_fusion`, `film`, `daft`, `tab_attention`, `tensor_fusion`, `healnet` (cfcml/networks/fusion/,
at their default settings), all trained with cross-entropy only. With `--tune-each N` every variant
is first searched (N trials over its own space, `variant_space`, on the comparison's folds;
`tuning.workflows.compare.tune_variants`) and compared both at its defaults and as
`<variant>_tuned`, its search's best values.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from cfcml.config import FUSION_VARIANTS, ConfigError, ExperimentConfig
from cfcml.data.manifest import PreparedDataset
from cfcml.evaluation import metric_keys
from cfcml.evaluation.metric_keys import auc_metric, headline_metrics
from cfcml.evaluation.metrics import MISSING, Estimate, format_estimate, format_number
from tuning.hpo.run import SearchRun
from tuning.hpo.space import Param, SearchConfig
from tuning.hpo.trial import VariantTrials
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from cfcml.data.spec import DatasetSpec
    from cfcml.evaluation.calibration import CalibrationSummary
    from cfcml.evaluation.oracle import OracleScores
    from cfcml.evaluation.subgroups import SubgroupResult

ABLATIONS: dict[str, dict[str, object]] = {  # variant -> experiment overrides
    "no_mg": {"model.multi_granularity": False},
    "no_cie": {"model.cie": False},
    "no_fine": {"loss.fine": False},
}
BASELINES: dict[str, dict[str, object]] = {
    "image_only": {"model.variant": "image_only", "loss.fine": False},
    "tabular_only": {"model.variant": "tabular_only", "loss.fine": False},
    "late_concat": {"model.variant": "late_concat", "loss.fine": False},
    **{name: {"model.variant": name, "loss.fine": False} for name in FUSION_VARIANTS},
}
VARIANTS = ("cfcml", "cfcml_tuned", *ABLATIONS, *BASELINES)

# `--tune-each N` (docs/evaluation.md, "Every variant tuned with the same budget"): what each
# variant's own search varies. Every variant: the optimiser and classifier dropout, over the ranges of
# conf/search/default.yaml. CFCML and the ablations that keep the fine stage: also the fine stage's
# temperatures, prototype momentum and term weights, over conf/search/default.yaml's own ranges
# (`FINE_STAGE_KEYS`, read from that file). Each fusion method: also its own settings
# (`cfcml.config`, model.fusion.<method>). Validated against the variant's configuration
# (`tuning.hpo.space.parse_space`) when the comparison is planned.
COMMON_SPACE: dict[str, dict[str, Any]] = {
    "optim.lr": {"dist": "loguniform", "low": 1.0e-5, "high": 2.0e-3},
    "optim.weight_decay": {"dist": "loguniform", "low": 1.0e-6, "high": 1.0e-2},
    "model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.7},
}
FINE_STAGE_KEYS = ("loss.tau_sam", "loss.tau_up", "loss.tau_cp", "loss.momentum", "loss.w_sam", "loss.w_up",
                   "loss.w_cp")
FINE_STAGE_SEARCH = "default"  # the search file whose ranges of FINE_STAGE_KEYS the CFCML variants search
FUSION_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "early_fusion": {"model.fusion.early_fusion.channels": {"dist": "int", "low": 2, "high": 16}},
    "film": {"model.fusion.film.hidden": {"dist": "choice", "values": [16, 32, 64, 128]}},
    "daft": {"model.fusion.daft.bottleneck": {"dist": "int", "low": 2, "high": 10},
             "model.fusion.daft.scale_activation": {"dist": "choice", "values": ["linear", "sigmoid", "tanh"]}},
    "tab_attention": {"model.fusion.tab_attention.layers": {"dist": "int", "low": 1, "high": 2},
                      "model.fusion.tab_attention.heads": {"dist": "choice", "values": [1, 2, 4]}},
    "tensor_fusion": {"model.fusion.tensor_fusion.hidden": {"dist": "int", "low": 8, "high": 32},
                      "model.fusion.tensor_fusion.rank": {"dist": "int", "low": 2, "high": 8}},
    "healnet": {"model.fusion.healnet.latents": {"dist": "choice", "values": [8, 16, 32]},
                "model.fusion.healnet.depth": {"dist": "int", "low": 1, "high": 3}},
}
TUNED_SUFFIX = "_tuned"  # `--tune-each`: variant `film` tuned is `film_tuned`, beside `film` at its defaults


def variant_space_raw(name: str) -> dict[str, dict[str, Any]]:
    """The space `--tune-each` searches for variant `name`, as a search file's `space:` writes it
    (dotted keys -> distributions; see `COMMON_SPACE`). ConfigError for `cfcml_tuned` (the tuned
    CFCML of --from-search, not tuned again) and unknown names."""
    from cfcml.config import read_config
    from tuning.hpo.space import search_path

    if name not in VARIANTS or name == "cfcml_tuned":
        raise ConfigError(f"variant {name!r} has no search space of its own (known: "
                          f"{', '.join(v for v in VARIANTS if v != 'cfcml_tuned')})", "--tune-each")
    raw = dict(COMMON_SPACE)
    if name in ("cfcml", "no_mg", "no_cie"):  # the variants that train with the fine stage
        file_space = read_config(search_path(FINE_STAGE_SEARCH)).get("space") or {}
        raw.update({k: file_space[k] for k in FINE_STAGE_KEYS})
    raw.update(FUSION_SPACES.get(name, {}))
    return raw


def variant_space(name: str, config: ExperimentConfig) -> tuple[Param, ...]:
    """`variant_space_raw(name)` validated against the variant's configuration `config` (every
    value it can sample keeps `config` valid); ConfigError naming the variant and key otherwise."""
    from tuning.hpo.space import parse_space

    return parse_space(variant_space_raw(name), config, f"--tune-each, variant {name}:")


@dataclass(frozen=True)
class ComparisonPlan:
    """Everything a comparison needs, resolved (see `plan_comparison`)."""

    dataset: str
    name: str
    variants: dict[str, ExperimentConfig]  # name -> configuration (the seed is set per trial)
    seeds: tuple[int, ...]
    data_root: Path
    runs_dir: Path
    out_dir: Path
    fold_seed: int | None = None
    tracking_uri: str | None = None
    address: str | None = None
    verbose: bool = False
    from_search: str | None = None
    # --search's budget (grace period, reduction factor, searcher), read by the --tune-each searches
    search: SearchConfig = field(default_factory=lambda: SearchConfig(name="experiment"))
    tune_each: int = 0  # trials of each variant's own search before the comparison; 0: no search

    @property
    def base(self) -> ExperimentConfig:
        return next(iter(self.variants.values()))

    @property
    def tuned_variants(self) -> list[str]:
        """The variants `--tune-each` searches: every one of the comparison (none without it)."""
        return list(self.variants) if self.tune_each else []

    def tune_name(self, variant: str) -> str:
        """The name (folder under runs/ray, MLflow run) of `variant`'s search: `<name>-tune-<variant>`."""
        return f"{self.name}-tune-{variant}"

    def variant_search(self, variant: str, resume: bool = False) -> SearchRun:
        """`variant`'s own search of `tune_each` trials (`tuning.hpo.driver.run_search`): its space
        (`variant_space`) over its configuration, the comparison's folds, fold seed, epoch budget and
        seed, --search's grace period, reduction factor and searcher; no final model (development
        folds only: the test split is not read)."""
        space = variant_space(variant, self.variants[variant])
        return SearchRun(
            dataset=self.dataset, search=dataclasses.replace(self.search, num_samples=self.tune_each, space=space),
            experiment=self.variants[variant], data_root=self.data_root, runs_dir=self.runs_dir,
            name=self.tune_name(variant), num_samples=self.tune_each, fold_seed=self.fold_seed,
            tracking_uri=self.tracking_uri, address=self.address, resume=resume, final=False, verbose=self.verbose)

    def with_tuned(self, params: dict[str, dict[str, Any]]) -> ComparisonPlan:
        """This plan with `<variant>_tuned` right after each `variant` of `params` (its search's best
        trial's values over the variant's configuration)."""
        variants: dict[str, ExperimentConfig] = {}
        for name, cfg in self.variants.items():
            variants[name] = cfg
            if name in params:
                variants[name + TUNED_SUFFIX] = cfg.replace(params[name])
        return dataclasses.replace(self, variants=variants)

    @property
    def max_epochs(self) -> int:
        return self.base.train.epochs

    def trials(self, prepared_dir: str) -> VariantTrials:
        """What each of its Tune trials is given (`tuning.hpo.trial.compare_trial`)."""
        return VariantTrials(dict(self.variants), self.max_epochs, prepared_dir, self.name,
                             str(self.runs_dir / "ray" / "train"))


def same_configurations(variants: dict[str, ExperimentConfig]) -> dict[str, str]:
    """Variants whose configuration equals an earlier variant's: later name -> the first such name.

    Two variants with the same configuration train the same models on the comparison's seeds and
    folds (every seed, fold and epoch budget is the comparison's), so a comparison trains only the
    first and gives the later one its models: a `<variant>_tuned` whose search chose the variant's
    own defaults (Optuna evaluates them first), or `cfcml_tuned` when the search chose the published
    defaults (`tuning.evidence.bought`). The report says which rows are one variant's models.

    Args:
        variants: name -> configuration, in the comparison's order.

    Returns:
        {later name: earlier name} for every later duplicate; empty when all differ.
    """
    firsts: list[tuple[str, ExperimentConfig]] = []  # configurations hold lists: compared, not hashed
    same: dict[str, str] = {}
    for name, cfg in variants.items():
        earlier = next((n for n, c in firsts if c == cfg), None)
        if earlier is None:
            firsts.append((name, cfg))
        else:
            same[name] = earlier
    return same


def variant_configs(base: ExperimentConfig, names: list[str],
                    tuned: dict[str, Any] | None) -> dict[str, ExperimentConfig]:
    """The configuration of each named variant on top of `base` (the published defaults)."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown} (known: {', '.join(VARIANTS)})", "--variants")
    if "cfcml_tuned" in names and tuned is None:
        raise ConfigError("cfcml_tuned needs a finished search: pass --from-search NAME", "--variants")
    out = {}
    for name in names:
        overrides = {**ABLATIONS, **BASELINES}.get(name, {})
        out[name] = base.replace(cast(dict[str, Any], tuned) if name == "cfcml_tuned" else overrides)  # checked above
    return out


def _dataset_name(dataset: str) -> str:
    """A dataset as `--dataset` names it: "men", or an experiment file's path (named by its stem)."""
    return Path(dataset).stem if Path(dataset).suffix else dataset


def tuned_values(folder: Path, dataset: str, base: ExperimentConfig) -> dict[str, Any]:
    """The searched values of the best trial of the finished search in `folder` (its
    `outcome.json`), for the `cfcml_tuned` variant of a comparison on `dataset` whose configuration
    is `base`. ConfigError ("--from-search: ...", naming the folder) when the search has not
    finished or has no scored trial, tuned another dataset (both named), searched keys `base` does
    not have (named), or found values `base` cannot take (e.g. a `model.dim` the comparison's
    head count does not divide). Checked before anything starts."""
    if not (folder / OUTCOME_FILE).is_file():
        raise ConfigError(f"no finished search at {folder} ({OUTCOME_FILE} missing)", "--from-search")
    outcome = SearchOutcome.load(folder / OUTCOME_FILE)
    if _dataset_name(outcome.dataset) != _dataset_name(dataset):
        raise ConfigError(f"the search in {folder} tuned dataset {outcome.dataset!r}, not this comparison's "
                          f"{dataset!r}: its values are another experiment's", "--from-search")
    best = outcome.best
    if best is None:
        raise ConfigError(f"the search in {folder} has no scored trial", "--from-search")
    unknown = []
    for key in dict.fromkeys([*outcome.searched, *best.params]):
        try:
            base.value(key)
        except ConfigError:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"the search in {folder} searched {', '.join(unknown)}, which this comparison's "
                          f"{dataset!r} configuration does not have", "--from-search")
    tuned = dict(best.params)
    try:
        base.replace(tuned)
    except ConfigError as exc:
        raise ConfigError(f"the best trial of the search in {folder} ({tuned}) does not fit this comparison's "
                          f"configuration: {exc}", "--from-search") from None
    return tuned


def plan_comparison(dataset: str, data_root: str | Path | None = None, *, variants: str | None = None,
                    from_search: str | None = None, seeds: int = 3, folds: int | None = None,
                    max_epochs: int | None = None, search: str | None = None, runs_dir: str | Path | None = None,
                    tracking_uri: str | None = None, out: str | Path | None = None, fold_seed: int | None = None,
                    image_size: list[int] | None = None, overrides: dict[str, Any] | None = None,
                    address: str | None = None, verbose: bool = False, name: str | None = None,
                    tune_each: int = 0) -> ComparisonPlan:
    """Resolve a comparison with the search's precedence (`tuning.hpo.run`): command line > the search
    file given by `search` (its overrides and budget) > experiment file > defaults.

    `tune_each` (--tune-each N, 0 = off): N trials of each variant's own search (`variant_space`)
    before the comparison, whose best values become the variant `<variant>_tuned`; every variant's
    space is checked here, before anything starts. Not with `from_search` (`cfcml_tuned` is then the
    comparison's own tuned `cfcml`)."""
    from cfcml.config import PROJECT_ROOT, load_experiment
    from tuning.hpo.run import DEFAULT_RUNS_DIR, cli_overrides, resolve_experiment
    from tuning.hpo.space import SearchConfig, load_search

    if seeds < 1:
        raise ConfigError(f"expected a positive integer, got {seeds}", "--seeds")
    if tune_each < 0:
        raise ConfigError(f"expected a positive integer (trials per variant), got {tune_each}", "--tune-each")
    if tune_each and (from_search or "cfcml_tuned" in [v.strip() for v in (variants or "").split(",")]):
        raise ConfigError("not with --from-search or the variant cfcml_tuned: with --tune-each, cfcml_tuned is "
                          "the comparison's own search of cfcml", "--tune-each")
    search_cfg = load_search(search, load_experiment(dataset)) if search else SearchConfig(name="experiment")
    base = resolve_experiment(dataset, search_cfg, cli_overrides(overrides, max_epochs=max_epochs, folds=folds,
                                                                 image_size=image_size))
    runs = Path(runs_dir or DEFAULT_RUNS_DIR).resolve()
    from tuning.runtime.preflight import check_name

    if name is not None:
        check_name(name, "--name", runs / "compare")
    tuned = None
    if from_search:
        check_name(from_search, "--from-search")
        tuned = tuned_values(runs / "ray" / from_search, dataset, base)
    names = [v.strip() for v in variants.split(",")] if variants else \
        [v for v in VARIANTS if v != "cfcml_tuned" or tuned is not None]
    if "cfcml" not in names:
        names.insert(0, "cfcml")  # every difference is measured against it
    name = name or check_name(f"{dataset}-{search_cfg.name}", "--name (default <dataset>-<search>)", runs / "compare")
    plan = ComparisonPlan(
        dataset=dataset, name=name, variants=variant_configs(base, names, tuned), seeds=tuple(range(seeds)),
        data_root=Path(data_root or PROJECT_ROOT / "data" / dataset).resolve(), runs_dir=runs,
        out_dir=Path(out).resolve() if out else runs / "compare" / name,
        fold_seed=fold_seed, tracking_uri=tracking_uri, address=address, verbose=verbose, from_search=from_search,
        search=search_cfg, tune_each=tune_each,
    )
    for variant in plan.tuned_variants:  # every space and search name checked before anything starts
        check_name(plan.tune_name(variant), "--name (with --tune-each)", runs / "ray")
        variant_space(variant, plan.variants[variant])
    return plan


# --------------------------------------------------------------------------------------- results


@dataclass
class VariantResult:
    name: str
    cv: dict[str, float] = field(default_factory=dict)  # mean over seeds of the last epoch's cv_*
    cv_sd: dict[str, float] = field(default_factory=dict)
    test: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # point, CI low, high
    test_probs: np.ndarray | None = None  # [N_test, C], the K x S fold-ensemble average
    diff_vs_cfcml: tuple[float, float, float] | None = None  # AUC difference, CI low, high
    seeds_done: int = 0
    # the earlier variant of the comparison whose configuration this one's equals (`same_configurations`):
    # its models are that variant's, not trained again
    same_as: str | None = None


@dataclass
class ComparisonResult:
    dataset: str
    metric: str  # the dataset's selection metric
    auc: str  # the AUC metric the differences are taken on
    task: str
    classes: list[str]
    variants: list[VariantResult]
    y_test: np.ndarray
    oracle: OracleScores | None  # the generator's oracle (synthetic data only)
    epochs: int
    folds: int
    seeds: int
    run_id: str | None = None
    tune_each: int = 0  # trials of each variant's own search (`<variant>_tuned`); 0: no search
    # per variant: calibration of its test fold ensemble (uncalibrated: nothing is fitted here) and
    # its metrics per subgroup of the dataset spec's `evaluation.subgroups`
    calibration: dict[str, CalibrationSummary] = field(default_factory=dict)
    subgroups: dict[str, list[SubgroupResult]] = field(default_factory=dict)

    @functools.cached_property
    def learnt(self) -> list[ClassLearnt]:
        """`learnt_classes` of this result, computed once (the report and the JSON both show it)."""
        return learnt_classes(self)

    def to_json(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)

        variants = {}
        for v in self.variants:
            entry: dict[str, Any] = {
                "cv": {k: clean(x) for k, x in v.cv.items()},
                "cv_sd": {k: clean(x) for k, x in v.cv_sd.items()},
                "test": {k: clean(x[0]) for k, x in v.test.items()},
                "test_ci": {k: [clean(x[1]), clean(x[2])] for k, x in v.test.items()},
                "seeds": v.seeds_done,
                "same_as": v.same_as,
            }
            if v.diff_vs_cfcml is not None:
                d = v.diff_vs_cfcml
                entry["diff_vs_cfcml"] = {"auc_diff": clean(d[0]), "ci_low": clean(d[1]), "ci_high": clean(d[2])}
            if v.name in self.calibration:
                c = self.calibration[v.name]
                entry["calibration"] = {"n_bins": c.n_bins, "brier": [clean(x) for x in c.brier],
                                        "ece": [clean(x) for x in c.ece]}
            if v.name in self.subgroups:
                entry["subgroups"] = [{"field": r.field, "category": r.category, "n": r.n, "too_small": r.too_small,
                                       "metrics": {k: [clean(x) for x in m] for k, m in r.metrics.items()}}
                                      for r in self.subgroups[v.name]]
            variants[v.name] = entry
        return {"dataset": self.dataset, "metric": self.metric, "auc_metric": self.auc, "classes": self.classes,
                "epochs": self.epochs, "folds": self.folds, "seeds": self.seeds, "n_test": int(len(self.y_test)),
                "tune_each": self.tune_each,
                "test_evaluation": f"fold ensemble: the {self.folds} fold models of each of {self.seeds} seeds, "
                                   f"probabilities averaged, at the last of {self.epochs} epochs",
                "variants": variants, "oracle": None if self.oracle is None else {
                    "features": list(self.oracle.features),
                    "cv": {k: clean(x) for k, x in self.oracle.cv.items()},
                    "test": {k: clean(x[0]) for k, x in self.oracle.test.items()},
                    "test_ci": {k: [clean(x[1]), clean(x[2])] for k, x in self.oracle.test.items()},
                    "class_reach": [{"class": r.name, "crossmodal": r.crossmodal,
                                     "one_vs_rest_auc": {"development_folds": {k: clean(x) for k, x in r.cv.items()},
                                                         "test": {k: clean(x) for k, x in r.test.items()}}}
                                    for r in self.oracle.reach]},
                "learnt": [{"variant": c.variant, "class": c.name,
                            "one_vs_rest_auc": [clean(c.auc.point), clean(c.auc.low), clean(c.auc.high)],
                            "recall": clean(c.recall), "oracle_auc": clean(c.oracle_auc),
                            "oracle_recall": clean(c.oracle_recall), "ceiling": clean(c.ceiling), "learnt": c.learnt}
                           for c in self.learnt]}


def aggregate(trials: list[dict[str, Any]], task: str, classes: list[str], y_test: np.ndarray,
              order: list[str], n_boot: int = 1000) -> list[VariantResult]:
    """trials: {"variant", "seed", "metrics" (last epoch), "test_probs" [N, C]} per finished trial."""
    from cfcml.evaluation.metrics import bootstrap_ci, paired_bootstrap_diff

    auc = auc_metric(task)
    out = []
    for name in order:
        mine = [t for t in trials if t["variant"] == name]
        result = VariantResult(name, seeds_done=len(mine))
        if mine:
            keys = [k for k in mine[0]["metrics"] if metric_keys.is_cv(k)]
            for k in keys:
                values = np.array([t["metrics"].get(k, np.nan) for t in mine], dtype=float)
                name = metric_keys.parse(k).name
                result.cv[name] = float(np.nanmean(values)) if not np.isnan(values).all() else math.nan
                result.cv_sd[name] = float(np.nanstd(values)) if not np.isnan(values).all() else math.nan
            result.test_probs = np.mean([t["test_probs"] for t in mine], axis=0)
            result.test = bootstrap_ci(task, y_test, result.test_probs, n_boot=n_boot, seed=0)
        out.append(result)
    reference = next((v for v in out if v.name == "cfcml" and v.test_probs is not None), None)
    for v in out:
        if reference is not None and v is not reference and v.test_probs is not None:
            v.diff_vs_cfcml = paired_bootstrap_diff(task, y_test, v.test_probs, reference.test_probs, auc,
                                                    n_boot=n_boot, seed=0)
    return out


# --------------------------------------------------------------------------------------- report


NO_ESTIMATE = Estimate(math.nan)  # a figure a variant lacks (no test predictions): printed as MISSING


def markdown(result: ComparisonResult) -> str:
    auc = result.auc
    recalls = headline_metrics(result.task, len(result.classes))[2:]
    recall_names = ([f"{c}" for c in result.classes] if result.task == "multiclass"
                    else [f"{result.classes[0]} (spec.)", f"{result.classes[1]} (sens.)"])
    lines = [
        f"# Comparison on {result.dataset}",
        "",
        f"{result.folds}-fold CV, {result.seeds} seed(s), {result.epochs} epochs, no selection (last epoch). "
        f"CV: mean ± sd over seeds of the mean validation metric over folds. Test ({len(result.y_test)} patients): "
        f"the fold ensemble of all folds and seeds, once per variant, bootstrap 95% CI; "
        f"Δ{auc}: paired bootstrap against `cfcml` on the same patients.",
        *([] if not result.tune_each else [
            "", f"`<variant>{TUNED_SUFFIX}`: the variant with the best values of its own search of {result.tune_each} "
                f"trials (its space, the same folds and epoch budget, selected on the CV metric; --tune-each); "
                f"`<variant>`: at its defaults."]),
        "",
        f"| variant | CV {auc} | CV bal. acc. | test {auc} [95% CI] | test bal. acc. [95% CI] | "
        f"test recall: {' / '.join(recall_names)} | Δ{auc} vs cfcml [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result.variants:
        t = {k: Estimate.of(x) for k, x in v.test.items()}
        diff = MISSING if v.diff_vs_cfcml is None else format_estimate(v.diff_vs_cfcml, signed=True)
        lines.append(
            f"| {v.name} | {format_number(v.cv.get(auc))} ± {format_number(v.cv_sd.get(auc))} "
            f"| {format_number(v.cv.get('balanced_accuracy'))} ± {format_number(v.cv_sd.get('balanced_accuracy'))} "
            f"| {format_estimate(t.get(auc, NO_ESTIMATE))} "
            f"| {format_estimate(t.get('balanced_accuracy', NO_ESTIMATE))} "
            f"| {' / '.join(format_number(t.get(r, NO_ESTIMATE).point, 2) for r in recalls)} | {diff} |")
    if result.oracle is not None:
        o = result.oracle
        ot = {k: Estimate.of(x) for k, x in o.test.items()}
        lines.append(f"| *oracle* (generator latents) | {format_number(o.cv.get(auc))} "
                     f"| {format_number(o.cv.get('balanced_accuracy'))} "
                     f"| {format_estimate(ot.get(auc, NO_ESTIMATE))} "
                     f"| {format_estimate(ot.get('balanced_accuracy', NO_ESTIMATE))} "
                     f"| {' / '.join(format_number(ot.get(r, NO_ESTIMATE).point, 2) for r in recalls)} | |")
        lines += ["", f"Oracle: logistic regression on the generator's latent signals ({', '.join(o.features)}), "
                      "same folds; read by this report only, never by training."]
    shared = [v for v in result.variants if v.same_as]
    if shared:
        lines += ["", "Same configuration, same models (not trained again): " + "; ".join(
            f"`{v.name}` = `{v.same_as}`" for v in shared) + ". A tuned variant listed here is one whose "
            "search chose its defaults: its Δ against the defaults is 0 by construction."]
    lines += _learning_lines(result) + _calibration_lines(result) + _subgroup_lines(result)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ClassLearnt:
    """One variant on one crossmodal class of a synthetic cohort (`learnt_classes`).

    Args:
        variant: the variant's name.
        name: the class (one no single modality identifies: `cfcml.evaluation.oracle.ClassReach`).
        auc: the variant's one-vs-rest test AUC of the class, bootstrap 95% CI.
        recall: its test recall of the class.
        oracle_auc, oracle_recall: the oracle's (both modalities' latents), on the same patients.
        ceiling: the best one-vs-rest test AUC of one modality's latents alone.
    """

    variant: str
    name: str
    auc: Estimate
    recall: float
    oracle_auc: float
    oracle_recall: float
    ceiling: float

    @property
    def learnt(self) -> bool:
        """The lower bound of its AUC's CI is above what one modality alone gives: it combines them."""
        return bool(np.isfinite(self.auc.low) and np.isfinite(self.ceiling) and self.auc.low > self.ceiling)


def learnt_classes(result: ComparisonResult, n_boot: int = 1000) -> list[ClassLearnt]:
    """Per variant with test predictions and per crossmodal class of the oracle: how close the
    variant comes to the oracle there (test split; empty without an oracle or a crossmodal class)."""
    from cfcml.evaluation.metrics import class_auc_ci, class_aucs

    o = result.oracle
    if o is None or not o.crossmodal:
        return []
    recalls = headline_metrics(result.task, len(result.classes))[2:]
    oracle_aucs = class_aucs(result.y_test, np.asarray(o.test_probs))
    out = []
    for v in result.variants:
        if v.test_probs is None:
            continue
        aucs = class_auc_ci(result.task, result.y_test, v.test_probs, n_boot=n_boot, seed=0)
        for k in o.crossmodal:
            out.append(ClassLearnt(v.name, result.classes[k], Estimate.of(aucs[k]),
                                   Estimate.of(v.test.get(recalls[k], NO_ESTIMATE)).point, oracle_aucs[k],
                                   Estimate.of(o.test.get(recalls[k], NO_ESTIMATE)).point, o.reach[k].ceiling))
    return out


def _learning_lines(result: ComparisonResult) -> list[str]:
    from cfcml.evaluation.oracle import BOTH, CROSSMODAL_MARGIN

    o = result.oracle
    if o is None or not o.reach:
        return []
    sources = [k for k in o.reach[0].cv if k != BOTH]
    if not o.crossmodal:
        return ["", "## What each method learns (synthetic data)", "",
                f"Every class is identified by one modality's latents alone (the oracle's one-vs-rest AUC with "
                f"both modalities is within {CROSSMODAL_MARGIN} of the better single one on the development folds): "
                f"no class here tests whether a method combines the modalities."]
    reach = "; ".join(f"**{r.name}** ({' / '.join(format_number(r.cv[s], 2) for s in sources)} / "
                      f"{format_number(r.cv[BOTH], 2)})" for r in (o.reach[k] for k in o.crossmodal))
    learnt = result.learnt
    lines = ["", "## What each method learns (synthetic data)", "",
             f"Classes no single modality identifies: by the generator's oracle, one-vs-rest AUC on the development "
             f"folds from the {' / '.join(sources)} latents alone / both together: {reach}. A method *learns* such "
             f"a class when the lower bound of its one-vs-rest test AUC's 95% CI is above the best single-modality "
             f"oracle's test AUC (the ceiling): it must combine image and table to get there. Δ: the method minus the "
             f"oracle (both modalities) on the same test patients.", "",
             "| variant | class | test AUC [95% CI] | Δ AUC vs oracle | recall | Δ recall vs oracle | ceiling "
             "| learns it |",
             "|---|---|---|---|---|---|---|---|"]
    for c in learnt:
        lines.append(f"| {c.variant} | {c.name} | {format_estimate(c.auc)} "
                     f"| {format_number(c.auc.point - c.oracle_auc, signed=True)} | {format_number(c.recall, 2)} "
                     f"| {format_number(c.recall - c.oracle_recall, 2, signed=True)} | {format_number(c.ceiling)} "
                     f"| {'**yes**' if c.learnt else 'no'} |")
    full = [v.name for v in result.variants if any(c.variant == v.name for c in learnt)
            and all(c.learnt for c in learnt if c.variant == v.name)]
    lines += ["", f"Learn every crossmodal class: {', '.join(f'`{n}`' for n in full)}." if full
              else "No method learns every crossmodal class."]
    return lines


def _calibration_lines(result: ComparisonResult) -> list[str]:
    if not result.calibration:
        return []
    bins = next(iter(result.calibration.values())).n_bins
    lines = ["", "## Calibration (test, fold ensembles as trained)", "",
             f"Brier score and ECE ({bins} equal-width bins of the top-label confidence), bootstrap 95% CIs; no "
             "temperature is fitted in a comparison (docs/evaluation.md).", "",
             "| variant | Brier [95% CI] | ECE [95% CI] |", "|---|---|---|"]
    lines += [f"| {name} | {format_estimate(c.brier)} | {format_estimate(c.ece)} |"
              for name, c in result.calibration.items()]
    return lines


def _subgroup_lines(result: ComparisonResult) -> list[str]:
    if not result.subgroups:
        return []
    names = list(result.subgroups)
    first = result.subgroups[names[0]]
    lines = ["", f"## Subgroups (test {result.auc}, bootstrap 95% CI)", "",
             "**too small**: fewer patients (or of some class) than the dataset spec's `evaluation` limits.", "",
             "| field | category | patients | " + " | ".join(names) + " | note |", "|---" * (4 + len(names)) + "|"]
    for i, r in enumerate(first):
        cells = " | ".join(format_estimate(result.subgroups[n][i].metrics[result.auc]) for n in names)
        lines.append(f"| {r.field} | {r.category} | {r.n} | {cells} | {'**too small**' if r.too_small else ''} |")
    return lines


def clinical_figures(task: str, y_test: np.ndarray, spec: DatasetSpec, test_rows: pd.DataFrame,
                     variants: list[VariantResult]
                     ) -> tuple[dict[str, CalibrationSummary], dict[str, list[SubgroupResult]]]:
    """Per variant with test predictions: its test calibration summary and its subgroup metrics
    (cfcml.evaluation.calibration, cfcml.evaluation.subgroups)."""
    from cfcml.evaluation.calibration import calibration_summary
    from cfcml.evaluation.subgroups import subgroup_metrics
    from tuning.evidence.clinical import subgroup_labels, subgroup_orders

    ev = spec.evaluation
    labels = subgroup_labels(test_rows, spec) if ev.subgroups else {}
    calibration, subgroups = {}, {}
    for v in variants:
        if v.test_probs is None:
            continue
        calibration[v.name] = calibration_summary(y_test, v.test_probs, ev.ece_bins)
        if labels:
            subgroups[v.name] = subgroup_metrics(task, y_test, v.test_probs, labels, ev.min_subgroup_n,
                                                 ev.min_subgroup_per_class, order=subgroup_orders(spec))
    return calibration, subgroups


def figures(result: ComparisonResult) -> dict[str, Figure]:
    from tuning.evidence.plots import plot_metric_bars, plot_roc_overlay

    probs = {v.name: v.test_probs for v in result.variants if v.test_probs is not None}
    reference = None
    if result.oracle is not None:
        probs["oracle"] = np.asarray(result.oracle.test_probs)
        reference = {k: result.oracle.test[k][0] for k in (result.auc, "balanced_accuracy") if k in result.oracle.test}
    rows = [{"name": v.name, "test": v.test, "cv": v.cv, "cv_sd": v.cv_sd} for v in result.variants]
    return {
        "roc_test.png": plot_roc_overlay(result.y_test, probs, f"{result.dataset}: test ROC (fold ensembles)"),
        "metric_bars.png": plot_metric_bars(rows, [result.auc, "balanced_accuracy"], reference,
                                            f"{result.dataset}: test (bars, 95% CI) and CV (dots, ± sd)"),
    }


def write_outputs(result: ComparisonResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "comparison.md", out_dir / "comparison.json"]
    paths[0].write_text(markdown(result), encoding="utf-8")
    paths[1].write_text(json.dumps(result.to_json(), indent=1), encoding="utf-8")
    for fname, fig in figures(result).items():
        fig.savefig(out_dir / fname, dpi=110)
        paths.append(out_dir / fname)
    return paths


# --------------------------------------------------------------------------------------- driver


def run_comparison(plan: ComparisonPlan, prepared: PreparedDataset) -> ComparisonResult:
    """Train every variant x seed as Ray trials, aggregate, write the outputs and a `comparison`
    MLflow run. Ray must be running (`tuning.runtime.ray_cluster.ray_session`)."""
    from mlflow.tracking import MlflowClient

    from cfcml.evaluation.metrics import selection_key
    from tuning.hpo.tuner import create_parent_run
    from tuning.tracking.lifecycle import owned_run
    from tuning.tracking.store import default_tracking_uri

    spec = prepared.spec
    metric = selection_key(spec.task, len(spec.classes), spec.selection_metric, plan.base.train.selection_metric)
    tracking_uri = plan.tracking_uri or default_tracking_uri(plan.runs_dir)
    client = MlflowClient(tracking_uri)
    parent = create_parent_run(client, plan.runs_dir, plan.dataset, f"comparison {plan.name}", kind="comparison",
                               group=f"compare/{plan.name}", prepared=prepared)
    # The comparison run and its variant runs end FINISHED, FAILED or KILLED however this ends.
    with owned_run(client, parent.run_id, children=True):
        return _compare(plan, prepared, client, parent.run_id, parent.experiment_id, tracking_uri, metric)


def _compare(plan: ComparisonPlan, prepared: PreparedDataset, client: MlflowClient, run_id: str, exp_id: str,
             tracking_uri: str, metric: str) -> ComparisonResult:
    from ray import tune

    from cfcml.evaluation.oracle import oracle_scores
    from cfcml.training import frame_probs
    from tuning.hpo.trial import compare_trial
    from tuning.hpo.tuner import build_trainable, build_tuner, fit_tuner, log_parent_inputs, trial_concurrency
    from tuning.records.checkpoints import open_checkpoint
    from tuning.tracking.callbacks import SearchTracker
    from tuning.tracking.store import log_metrics

    spec = prepared.spec
    log_parent_inputs(client, run_id, prepared, {
        "variants": ",".join(plan.variants), "seeds": len(plan.seeds), "epochs": plan.max_epochs,
        "folds": prepared.folds, "fold_seed": prepared.fold_seed, "from_search": plan.from_search or "",
        "metric": metric, "tune_each": plan.tune_each})

    same = same_configurations(plan.variants)
    for later, earlier in same.items():
        print(f"variant {later}: the same configuration as {earlier} (its search chose those values); its rows are "
              f"{earlier}'s models, not trained again")
    trained = [v for v in plan.variants if v not in same]
    trainable = build_trainable(compare_trial, trials=plan.trials(str(prepared.out_dir)))
    tracker = SearchTracker(tracking_uri, exp_id, run_id, f"compare/{plan.name}", metric, list(spec.classes),
                            spec.task, kind="comparison-trial", name_keys=("variant", "seed"), plots_from="last")
    # The table of running trials every minute (Tune's default is every 5 s); the tracker prints a
    # line as each trial finishes.
    reporter = tune.CLIReporter(metric_columns={"epoch": "epoch", metric: metric},
                                parameter_columns=["variant", "seed"], max_report_frequency=60)
    tuner = build_tuner(
        trainable,
        param_space={"variant": tune.grid_search(trained), "seed": tune.grid_search(list(plan.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=trial_concurrency(plan.base.train)),
        name=f"compare-{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(plan.runs_dir / "ray"),
        callbacks=[tracker], reporter=reporter, stall_s=plan.base.train.stall_timeout_s,
    )
    results = fit_tuner(tuner)
    from tuning.tracking.lifecycle import end_children

    # Ctrl-C: Tune returns with the running trials marked terminated, without the tracker's end of trial
    end_children(client, exp_id, run_id, "KILLED", "the comparison stopped before this trial ended (Ctrl-C)")

    test = prepared.test_frame()  # read once, after every model has finished training
    trials, failed = [], []
    for r in results:  # type: ignore[attr-defined]  # ResultGrid iterates by __getitem__, unseen by mypy
        df = r.metrics_dataframe
        paths = [] if df is None or "checkpoint_path" not in df else [p for p in df["checkpoint_path"] if p]
        if r.error or not paths:
            failed.append(f"{r.config.get('variant')} seed {r.config.get('seed')}: {r.error or 'no checkpoint'}")
            continue
        with open_checkpoint(paths[-1]) as ckpt:
            probs = frame_probs(ckpt.test_predictions(), spec.classes)
            trials.append({"variant": r.config["variant"], "seed": r.config["seed"], "metrics": ckpt.metrics(),
                           "test_probs": probs})
    for message in failed:
        print(f"trial failed: {message}")
    trials += [{**t, "variant": later} for later, earlier in same.items() for t in trials if t["variant"] == earlier]
    y_test = test["label"].to_numpy()
    result = ComparisonResult(
        dataset=plan.dataset, metric=metric, auc=auc_metric(spec.task), task=spec.task,
        classes=list(spec.classes), variants=aggregate(trials, spec.task, list(spec.classes), y_test,
                                                       list(plan.variants)),
        y_test=y_test, epochs=plan.max_epochs, folds=prepared.folds, seeds=len(plan.seeds), run_id=run_id,
        oracle=oracle_scores(prepared), tune_each=plan.tune_each,
    )
    for v in result.variants:
        v.same_as = same.get(v.name)
    result.calibration, result.subgroups = clinical_figures(spec.task, y_test, spec, test, result.variants)
    paths = write_outputs(result, plan.out_dir)
    values = {}
    for v in result.variants:
        values.update({metric_keys.variant(v.name, metric_keys.cv(k)): x for k, x in v.cv.items()})
        values.update({metric_keys.variant(v.name, metric_keys.test(k)): x[0] for k, x in v.test.items()})
        if v.diff_vs_cfcml:
            values[metric_keys.variant(v.name, metric_keys.diff(result.auc))] = v.diff_vs_cfcml[0]
    log_metrics(client, run_id, values)
    for path in paths:
        client.log_artifact(run_id, str(path))
    if failed:
        from tuning.tracking.lifecycle import end_run

        end_run(client, run_id, "FAILED", f"{len(failed)} trial(s) failed: " + "; ".join(failed))
    else:
        client.set_terminated(run_id, "FINISHED")
    return result
