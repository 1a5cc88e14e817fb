"""`SearchRun`: everything one search needs, resolved once from the YAML files and the command line.

Precedence, lowest first (each setting has one owner after this):

1. the dataclass defaults of `cfcml.config`;
2. the experiment file `conf/experiments/<dataset>.yaml`;
3. the search file `conf/search/<search>.yaml`: its `overrides:`, its `dataset_overrides.<dataset>`,
   its budget keys `max_epochs` (-> `train.epochs`) and `folds` (-> `train.folds`), and its primary
   objective `objectives[0]` (-> `train.selection_metric`);
4. the command line: `--set KEY=VALUE` pairs, then the dedicated flags (`--max-epochs`, `--folds`,
   `--seed`, `--image-size`, `--workers`, ...), which are shorthands for `--set` of one key.

After that `experiment.train.epochs` is the epoch budget of every trial and `experiment.train.folds`
the number of folds; nothing else is consulted. The number of trials is the search file's
`num_samples` unless `--num-samples` is given. The fold seed is not an experiment setting: it
belongs to the prepared dataset (recorded in its manifest), see `tuning.hpo.prepared`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cfcml.config import PROJECT_ROOT, ConfigError, ExperimentConfig, load_experiment, load_yaml
from tuning.hpo.space import SearchConfig, check_space, load_search, search_path

if TYPE_CHECKING:
    from cfcml.data.spec import DatasetSpec

DEFAULT_RUNS_DIR = PROJECT_ROOT / "runs"

# Settings a resumed search may take anew: they decide how fast and where trials run and how often a
# crashed worker is retried, not what is trained or selected. Every other resolved setting (the
# experiment, the search file, the trial count, the data by content) must equal the recorded one.
RESUME_MAY_CHANGE = ("train.max_failures", "train.cpus_per_worker", "train.prefetch_factor", "train.stall_timeout_s")


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs; values are read as YAML (numbers, lists, true/false, null).
    ConfigError naming the pair for one without `=` or whose value is not YAML (a mapping value
    naming a key twice included)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.pretrained=/weights/swin_t.pt")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
    return out


def cli_overrides(overrides: dict[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
    """`--set` pairs, then the dedicated flags (None = not given), as dotted experiment keys."""
    keys = {"max_epochs": "train.epochs", "folds": "train.folds", "seed": "train.seed",
            "image_size": "train.image_size", "workers": "train.workers",
            "cpus_per_worker": "train.cpus_per_worker", "gpus_per_worker": "train.gpus_per_worker"}
    unknown = set(flags) - set(keys)
    if unknown:
        raise TypeError(f"unknown flag(s) {sorted(unknown)}")
    given = {keys[k]: (list(v) if k == "image_size" else v) for k, v in flags.items() if v is not None}
    return {**(overrides or {}), **given}


def resolve_experiment(dataset: str, search: SearchConfig, cli: dict[str, Any]) -> ExperimentConfig:
    """Experiment file <- search file <- command line (`cli`: dotted keys), validated once."""
    base = load_experiment(dataset)
    from_search = dict(search.overrides)
    if search.max_epochs is not None:
        from_search["train.epochs"] = search.max_epochs
    if search.folds is not None:
        from_search["train.folds"] = search.folds
    if search.objectives:
        from_search["train.selection_metric"] = search.objectives[0]
    return base.replace({**from_search, **cli})


@dataclass(frozen=True)
class SearchRun:
    """A search, fully resolved. Build it with `SearchRun.build`."""

    dataset: str  # conf/datasets/<dataset>.yaml and conf/experiments/<dataset>.yaml
    search: SearchConfig
    experiment: ExperimentConfig  # every trial's base configuration (the searched keys vary)
    data_root: Path  # a raw dataset folder, or a prepared one (holding manifest.parquet)
    runs_dir: Path  # Ray results, checkpoints, the default MLflow store
    name: str
    num_samples: int
    fold_seed: int | None = None  # None: the prepared dataset's own (0 when preparing anew)
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or a SQLite store in runs_dir
    address: str | None = None  # a Ray cluster; None: a local Ray
    resume: bool = False
    final: bool = True  # retrain the best configuration, test it once, register it
    # Grad-CAM figures of test patients on the final run (their images leave with the run): opt-in
    explain_test_patients: bool = False
    verbose: bool = False  # Ray's own worker and per-epoch log lines on the console
    # nested cross-validation: K outer folds, each a whole search (tuning.workflows.nested); None: off.
    # Not a setting of the ordinary search (not in `settings`): each outer search records its own.
    outer_folds: int | None = None
    # what tuning bought (`tuning.evidence.bought`): seeds of the closing comparison of the published
    # defaults and the chosen configuration; 0: off. The search file's `bought_seeds` unless
    # --bought-seeds; not in `settings` (it decides what runs after the search, not the search).
    bought_seeds: int = 0
    # trials at once (Tune's max_concurrent_trials); None: as many as the cluster fits
    # (`tuning.hpo.tuner.trial_concurrency`). A search sharing the cluster with others gets its share
    # (`tuning.runtime.concurrent`); not in `settings`.
    max_concurrent: int | None = None

    @property
    def max_epochs(self) -> int:
        return self.experiment.train.epochs

    def metric(self, spec: DatasetSpec) -> str:
        """The selection metric ("cv_<name>") on a dataset with `spec`; ConfigError if the task has
        no such metric (train.selection_metric, else the dataset's)."""
        from cfcml.evaluation.metric_keys import MINIMISED
        from cfcml.evaluation.metrics import metric_names, selection_key

        known = (*metric_names(spec.task, len(spec.classes)), *MINIMISED)
        for i, name in enumerate(self.search.objectives):
            if name not in known:
                raise ConfigError(f"{name!r} is not a validation figure of this {spec.task} task "
                                  f"(known: {', '.join(known)})", f"search {self.search.name!r} objectives[{i}]")
        return selection_key(spec.task, len(spec.classes), spec.selection_metric,
                             self.experiment.train.selection_metric)

    @property
    def objective_keys(self) -> list[str]:
        """The Tune keys Optuna receives per trial of a multi-objective search: `selected_cv_<name>`
        of each objective, the primary first (each objective's value at the trial's selected epoch)."""
        from cfcml.evaluation import metric_keys

        return [metric_keys.selected(metric_keys.cv(name)) for name in self.search.objectives]

    def settings(self, dataset_fingerprint: str) -> dict[str, Any]:
        """Everything this search resolved to, as plain dotted keys: the dataset (by name and by
        the prepared data's content fingerprint), the search file's budget and space, the trial
        count, and every experiment key (`train.*`, `model.*`, `loss.*`, `optim.*`). What
        `--resume` compares (less `RESUME_MAY_CHANGE`)."""
        import json

        from cfcml.config import flatten_dict

        # the overrides are in the experiment; `bought_seeds` decides what runs after the search (a
        # resume may change it, and a state file recorded before the key existed stays comparable)
        search = {k: v for k, v in dataclasses.asdict(self.search).items()
                  if k not in ("space", "overrides", "dataset_overrides", "bought_seeds")}
        out = {"dataset": self.dataset, "dataset_fingerprint": dataset_fingerprint, "num_samples": self.num_samples,
               **{f"search.{k}": v for k, v in search.items()},
               **{f"search.space.{p.key}": {"dist": p.dist, "low": p.low, "high": p.high, "values": list(p.values)}
                  for p in self.search.space},
               **flatten_dict(self.experiment.to_dict())}
        return json.loads(json.dumps(out, default=str))  # tuples as lists: equal to what a state file holds

    @property
    def storage(self) -> Path:
        """Ray's storage: the search folder and every trial's Ray Train run live below it."""
        return self.runs_dir / "ray"

    @property
    def search_dir(self) -> Path:
        return self.storage / self.name

    @classmethod
    def build(
        cls,
        dataset: str,
        search: str = "default",
        *,
        data_root: str | Path | None = None,
        runs_dir: str | Path | None = None,
        name: str | None = None,
        num_samples: int | None = None,
        max_epochs: int | None = None,
        folds: int | None = None,
        seed: int | None = None,
        fold_seed: int | None = None,
        image_size: list[int] | tuple[int, ...] | None = None,
        workers: int | None = None,
        cpus_per_worker: float | None = None,
        gpus_per_worker: float | None = None,
        overrides: dict[str, Any] | None = None,
        tracking_uri: str | None = None,
        address: str | None = None,
        resume: bool = False,
        final: bool = True,
        explain_test_patients: bool = False,
        verbose: bool = False,
        outer_folds: int | None = None,
        bought_seeds: int | None = None,
    ) -> SearchRun:
        """Resolve a search from its names and the command line's values (None = not given).

        Raises ConfigError naming the file and key (or flag) of the first bad value.
        """
        search_cfg = load_search(search, load_experiment(dataset))
        cli = cli_overrides(overrides, max_epochs=max_epochs, folds=folds, seed=seed, image_size=image_size,
                            workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
        experiment = resolve_experiment(dataset, search_cfg, cli)
        if search_cfg.objectives and experiment.train.selection_metric != search_cfg.objectives[0]:
            raise ConfigError(f"{experiment.train.selection_metric!r} differs from the search's primary objective "
                              f"{search_cfg.objectives[0]!r} ({search_path(search)} objectives[0]); drop one",
                              "--set train.selection_metric")
        if cli:  # the space was checked against the search file's experiment; now against the final one
            check_space(search_cfg.space, experiment, f"{search_path(search)} (with --set and the flags):")
        if outer_folds is not None and outer_folds < 2:
            raise ConfigError(f"--outer-folds: expected at least 2 outer folds, got {outer_folds}")
        if bought_seeds is not None and bought_seeds < 0:
            raise ConfigError(f"expected 0 (off) or a positive number of seeds, got {bought_seeds}", "--bought-seeds")
        if num_samples is not None and num_samples < 1:
            raise ConfigError(f"--num-samples: expected a positive integer, got {num_samples}")
        from tuning.runtime.preflight import check_name

        runs = Path(runs_dir or DEFAULT_RUNS_DIR).resolve()
        # a folder, a Tune experiment and a value in MLflow filters: checked before anything starts
        name = check_name(name if name is not None else f"{dataset}-{search_cfg.name}",
                          "--name" if name is not None else "--name (default <dataset>-<search>)", runs / "ray")
        return cls(
            dataset=dataset,
            search=search_cfg,
            experiment=experiment,
            data_root=Path(data_root or PROJECT_ROOT / "data" / dataset).resolve(),
            runs_dir=runs,
            name=name,
            num_samples=num_samples or search_cfg.num_samples,
            fold_seed=fold_seed,
            tracking_uri=tracking_uri,
            address=address,
            resume=resume,
            final=final,
            explain_test_patients=explain_test_patients,
            verbose=verbose,
            outer_folds=outer_folds,
            bought_seeds=search_cfg.bought_seeds if bought_seeds is None else bought_seeds,
        )
