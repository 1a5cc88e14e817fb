"""What a finished search hands to the next stages: one `TrialResult` per trial and the
`SearchOutcome` (written as `outcome.json` in the search folder, read back by the final step,
the report and `compare.py --from-search`)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from cfcml.config import ExperimentConfig, from_dict
from cfcml.evaluation import metric_keys

OUTCOME_FILE = "outcome.json"
SELECTED_EPOCH = metric_keys.SELECTED_EPOCH  # reported every epoch: the epoch `selected_key(metric)` comes from


def selected_key(metric: str) -> str:
    """The running selected score reported every epoch next to `metric` ("cv_<name>"):
    "selected_cv_<name>", the maximum of `metric` over the trial's epochs so far. It is what Tune's
    scheduler (ASHA) compares, what Optuna receives as a trial's value and what picks the best
    trial, so all three act on one quantity."""
    return metric_keys.selected(metric)


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class EpochReport:
    """One epoch as a Ray Train worker reports it (`tuning.hpo.trainer`), read back on the driver's side
    (`tuning.tracking.store`, `tuning.hpo.driver`): Ray Train and Tune carry a flat dict, `to_dict` and
    `from_dict` are its two ends, so the named fields are spelt in this class only.

    Args:
        metrics: the epoch's figures: `epoch` (1-based), `train_*`, `val_*`, `cv_*`, the running
            selection (`selected_*`, `selected_epoch`) and `system/*`.
        time_compute_s: the worker's seconds in training and validation so far in this process (not
            start-up, not checkpointing); with Tune's `time_total_s` it tells the overhead apart.
        time_setup_s: the worker's seconds from its start to its first epoch (data, model, restore).
        resumed_from_epoch: the epoch of the checkpoint this process restored, 0 if none.
        checkpointed: whether this epoch wrote a checkpoint (`tuning.hpo.trainer.CheckpointPolicy`).
        restored: the restored checkpoint's own report, re-sent once with the first report after a
            restart (the driver logs that epoch if its report was lost); None otherwise.
        checkpoints_skipped: damaged checkpoints passed over for an older one, one message each,
            sent once with the first report.
        scan_backend: the selective scan the run's model actually runs ("chunked", "triton", ...,
            "none" without Mamba blocks; `cfcml.training.CrossValidation.scan_backend`), sent with
            every report; the driver tags the run with it (`tuning.tracking.store.SCAN_BACKEND_TAG`).
    """

    metrics: dict[str, Any]
    time_compute_s: float = 0.0
    time_setup_s: float = 0.0
    resumed_from_epoch: int = 0
    checkpointed: bool = False
    restored: dict[str, Any] | None = None
    checkpoints_skipped: list[str] = field(default_factory=list)
    scan_backend: str | None = None

    FIELDS = ("time_compute_s", "time_setup_s", "resumed_from_epoch", "checkpointed", "restored",
              "checkpoints_skipped", "scan_backend")

    @property
    def epoch(self) -> int:
        return int(self.metrics.get("epoch", 0))

    @property
    def retrained(self) -> bool:
        """Whether the values come from an epoch just trained, rather than being the re-sent report
        of the checkpoint a finished run restored (sent as both the report and its `restored`)."""
        return not (self.restored is not None and int(self.restored.get("epoch", -1)) == self.epoch)

    def to_dict(self, with_restart: bool = True) -> dict[str, Any]:
        """The flat dict Ray Train reports; `with_restart=False` leaves out `restored` and
        `checkpoints_skipped` (what a checkpoint's own metrics file keeps)."""
        out = {**self.metrics, "time_compute_s": self.time_compute_s, "time_setup_s": self.time_setup_s,
               "resumed_from_epoch": self.resumed_from_epoch, "checkpointed": self.checkpointed}
        if with_restart and self.restored is not None:
            out["restored"] = self.restored
        if with_restart and self.checkpoints_skipped:
            out["checkpoints_skipped"] = list(self.checkpoints_skipped)
        if self.scan_backend is not None:
            out["scan_backend"] = self.scan_backend
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EpochReport:
        """From a report as Tune or Ray Train hands it to the driver (their own keys, such as
        `timestamp` or `checkpoint_path`, stay in `metrics`)."""
        restored = values.get("restored")
        skipped = values.get("checkpoints_skipped")
        return cls(
            metrics={k: v for k, v in values.items() if k not in cls.FIELDS},
            time_compute_s=float(values.get("time_compute_s") or 0.0),
            time_setup_s=float(values.get("time_setup_s") or 0.0),
            resumed_from_epoch=int(values.get("resumed_from_epoch") or 0),
            checkpointed=bool(values.get("checkpointed", False)),
            restored=dict(restored) if isinstance(restored, Mapping) else None,
            checkpoints_skipped=[str(m) for m in skipped] if isinstance(skipped, (list, tuple)) else [],
            # a string or nothing (a results table gives NaN where a report had none)
            scan_backend=values.get("scan_backend") if isinstance(values.get("scan_backend"), str) else None,
        )


def _improves(value: object, best: float | None) -> TypeGuard[float]:
    """The rule for one epoch: whether its `value` of the selection metric takes the selection from
    the epochs before it (`best`: their selected score, None when none had a finite one). A finite
    value at least as high does: of tied epochs the latest wins; NaN or a missing value never does."""
    return _finite(value) and (best is None or value >= best)


@dataclass
class EpochSelection:
    """The one rule that picks a trial's epoch: the highest `metric` (the mean over validation
    folds), and among tied epochs the latest. Latest, because Ray Train's checkpoint retention
    (`CheckpointConfig(checkpoint_score_attribute=...)`) ranks a later checkpoint above an earlier
    one with the same score and deletes the earlier first: the selected epoch's weights are the ones
    kept. Ties are common (an AUC of 1.0 on a small fold, a balanced accuracy that moves in steps).
    An epoch whose metric is NaN or missing is never selected.

    One object follows one trial's reports in the order they were made, and three callers use it:
    the trial's worker (`tuning.hpo.trainer`) reports `update`'s fields with every epoch (what ASHA,
    Optuna and the best-trial choice act on); the driver (`tuning.hpo.driver.collect_trials`) picks
    the trial's epoch, metrics and checkpoint from Tune's rows; the tracker
    (`tuning.tracking.callbacks.SearchTracker`) picks the checkpoint a finished trial's plots come
    from. A report of an epoch at or below an earlier one (a restart from an older checkpoint
    retrained it) replaces that epoch and drops every later one, as `lineage` does: discarded epochs
    never count. `restore` continues from the fields a checkpoint was reported with (a restarted
    worker knows the epochs before it only through them).

    Args:
        metric: the selection metric, "cv_<name>" (`cfcml.evaluation.metrics.selection_key`).
        also: more keys of the reports ("cv_balanced_accuracy": a multi-objective search's other
            objectives) whose values at the selected epoch are reported as `selected_<key>` beside
            the selected score; they never pick the epoch.
        score: the selected epoch's `metric`; None until an epoch has a finite one.
        epoch: the selected epoch (1-based); 0 until one is selected.
    """

    metric: str
    also: tuple[str, ...] = ()
    score: float | None = None
    epoch: int = 0
    # the trial's lineage so far: epoch -> (its finite `metric` or None, the `ref` it was reported with)
    _kept: dict[int, tuple[float | None, Any]] = field(default_factory=dict, repr=False)
    _restored: tuple[float, int] | None = field(default=None, repr=False)  # (score, epoch) of `restore`
    # epoch -> the `also` values it was reported with (NaN when missing); -1: those of `restore`
    _also: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)

    def update(self, metrics: Mapping[str, Any], ref: Any = None) -> dict[str, float]:
        """Take one epoch's report.

        Args:
            metrics: the report: its `epoch` (1-based) and `metric` (absent or NaN: not selectable).
            ref: what `selected` hands back while this epoch is the selected one (a checkpoint's
                path, the report's row); None if the caller needs nothing.

        Returns:
            The fields reported with the epoch: `selected_key(metric)` (NaN before any finite
            score) and `SELECTED_EPOCH`.
        """
        epoch = int(metrics["epoch"])
        if self.epoch >= epoch or any(e >= epoch for e in self._kept):
            self._rewind(epoch)
        value = metrics.get(self.metric)
        self._kept[epoch] = (float(value) if _finite(value) else None, ref)
        if self.also:
            self._also[epoch] = {k: float(v) if _finite(v := metrics.get(k)) else math.nan for k in self.also}
        if _improves(value, self.score):
            self.score, self.epoch = float(value), epoch
        return self.fields()

    def fields(self) -> dict[str, float]:
        """`{selected_key(metric): score (NaN if none), SELECTED_EPOCH: epoch}`, and
        `selected_<key>` of each `also` key: its value at the selected epoch (NaN if none)."""
        out = {selected_key(self.metric): math.nan if self.score is None else self.score, SELECTED_EPOCH: self.epoch}
        if self.also:
            values = self._also.get(self.epoch) or (self._also.get(-1, {}) if self._restored is not None
                                                    and self._restored[1] == self.epoch else {})
            out.update({metric_keys.selected(k): values.get(k, math.nan) for k in self.also})
        return out

    @property
    def selected(self) -> Any:
        """The `ref` the selected epoch was reported with (None if none, or if it was selected
        before a `restore`)."""
        return self._kept.get(self.epoch, (None, None))[1]

    def restore(self, metrics: Mapping[str, Any]) -> None:
        """Continue from the metrics a checkpoint was written with (their `selected_key(metric)`
        and `SELECTED_EPOCH`); nothing changes when they hold no finite selected score."""
        value = metrics.get(selected_key(self.metric))
        if _finite(value):
            self.score, self.epoch = float(value), int(metrics.get(SELECTED_EPOCH, 0))
            self._restored, self._kept = (self.score, self.epoch), {}
            self._also = {-1: {k: float(v) if _finite(v := metrics.get(metric_keys.selected(k))) else math.nan
                               for k in self.also}}

    def _rewind(self, epoch: int) -> None:
        """Drop `epoch` and every later one (retrained after a restart), then select again among
        the epochs kept."""
        self._kept = {e: v for e, v in self._kept.items() if e < epoch}
        self._also = {e: v for e, v in self._also.items() if e < epoch}
        restored = self._restored if self._restored is not None and self._restored[1] < epoch else None
        self.score, self.epoch = restored if restored is not None else (None, 0)
        for e in sorted(self._kept):
            value = self._kept[e][0]
            if _improves(value, self.score):
                self.score, self.epoch = value, e


SELECTED_NOTE = ("selected_*: the best trial at its selected epoch, a maximum over epochs and trials "
                 "(optimistic); last_epoch_*: the same trial at its last epoch (no maximum over epochs, "
                 "still the best of the trials); see docs/evaluation.md")


def published_cv(trial: TrialResult,
                 prefixes: tuple[str, ...] = metric_keys.prefixes(metric_keys.CV, metric_keys.VAL, metric_keys.TRAIN)
                 ) -> dict[str, float]:
    """The figures a finished search publishes of its best trial, each named for how it was chosen:
    `selected_<key>` for the metrics at the selected epoch (the trial's and epoch's maximum: an
    optimistic estimate), `last_epoch_<key>` for the `cv_*` at its last epoch (not maximised over
    epochs). Keys of `trial.metrics` starting with one of `prefixes` are published."""
    out = {metric_keys.selected(k): v for k, v in trial.metrics.items() if k.startswith(prefixes)}
    out.update({metric_keys.last_epoch(k): v for k, v in trial.last_epoch_metrics.items()})
    return out


FRONT_RULE = ("of the Pareto front (the trials no other trial beats on every objective at once), the point "
              "nearest the ideal point after scaling each objective to [0, 1] over the front (1 its best "
              "value there); ties: the better primary objective, then the earlier trial")


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether point `a` dominates `b`: at least as good on every objective and better on one.

    Args:
        a, b: one value per objective, in the order of `modes`.
        modes: "max" or "min" per objective (`cfcml.evaluation.metric_keys.objective_mode`).
    """
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    at_least = all(s * x >= s * y for s, x, y in zip(sign, a, b, strict=True))
    return at_least and any(s * x > s * y for s, x, y in zip(sign, a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """The indices (in order) of the points no other point dominates (`dominates`); equal points
    are all kept. Every value must be finite (`SearchOutcome.front` leaves out trials with a NaN)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, modes) for q in points)]


def nearest_to_ideal(points: Sequence[Sequence[float]], modes: Sequence[str]) -> int:
    """The one rule that picks the front point a multi-objective search retrains (`FRONT_RULE`).

    Each objective is scaled to [0, 1] over `points` (1: the best value among them, whether the
    objective is maximised or minimised; an objective on which all points are equal is 1 for all),
    and the point at the least Euclidean distance from the ideal (1, ..., 1) wins; of tied points
    the one better on the first (primary) objective, then the first.

    Args:
        points: the front, one value per objective each (non-empty).
        modes: "max" or "min" per objective.

    Returns:
        The index of the chosen point in `points`.
    """
    if not points:
        raise ValueError("nearest_to_ideal needs at least one point")
    scaled = []
    for j, mode in enumerate(modes):
        column = [p[j] for p in points]
        low, high = min(column), max(column)
        span = high - low
        scaled.append([1.0 if span == 0 else ((v - low) if mode == "max" else (high - v)) / span for v in column])
    distance = [math.fsum((1.0 - scaled[j][i]) ** 2 for j in range(len(modes))) for i in range(len(points))]
    primary = 1.0 if modes[0] == "max" else -1.0
    return min(range(len(points)), key=lambda i: (distance[i], -primary * points[i][0], i))


def lineage(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A trial's epochs as the model that exists went through them, from its reports in the order
    they were made: a report of an epoch at or below an earlier one (a restart from an older
    checkpoint retrained it) replaces that epoch and drops every later one. Epochs strictly
    increase in the result; retrained values win over discarded ones."""
    out: list[Mapping[str, Any]] = []
    for row in rows:
        epoch = int(row["epoch"])
        while out and int(out[-1]["epoch"]) >= epoch:
            out.pop()
        out.append(row)
    return out


@dataclass
class TrialResult:
    """One trial of a search at its selected epoch by the CV selection metric (validation folds
    only; the test split is never seen), as the driver collects it and `outcome.json` keeps it.

    `score` is selected: the maximum over the trial's epochs (`EpochSelection`), so an optimistic
    estimate of that configuration; `last_epoch_metrics` holds the `cv_*` of its last epoch, which
    no maximum over epochs touched. A trial that produced no score has `error` set and no `score`.

    Args:
        trial_id: Tune's trial id; its MLflow run carries it as `cfcml.trial_id`.
        params: the searched values, by dotted key ("loss.w_sam"), as the trial trained them.
        score: the selection metric (`SearchOutcome.metric`) at `epoch`: its maximum over the
            trial's epochs; None when the trial produced no score.
        epoch: the selected epoch, 1-based (the latest of tied best ones): its checkpoint holds the
            weights, and the final model trains for that many epochs.
        epochs_run: epochs the trial ran (below the search's max_epochs when ASHA stopped it).
        wall_s: seconds on Tune's clock for the trial function.
        compute_s: seconds in training and validation; `wall_s - compute_s` is start-up overhead.
        checkpoint_path: the selected epoch's checkpoint folder, when Ray Train kept it.
        metrics: every figure at `epoch`: `cv_*` (mean over validation folds), `val_*_fold<k>`,
            `train_*`.
        last_epoch_metrics: the `cv_*` at epoch `epochs_run`.
        history: per epoch, {"epoch", the selection metric, "timestamp" (Unix time, seconds)}.
        experiment: the full configuration the trial trained (None in outcome files that predate it).
        error: why the trial produced no score (the last lines of its traceback); None if it did.
    """

    trial_id: str
    params: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    epoch: int = 0
    epochs_run: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0
    checkpoint_path: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    last_epoch_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    experiment: ExperimentConfig | None = None
    error: str | None = None

    @property
    def scored(self) -> bool:
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["experiment"] = self.experiment.to_dict() if self.experiment else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        data = dict(data)
        if data.get("experiment") is not None:
            data["experiment"] = from_dict(ExperimentConfig, data["experiment"], "outcome experiment")
        return cls(**data)


@dataclass
class SearchOutcome:
    """What a search leaves for the steps after it (the final model, the report, the summary,
    `pipelines/train_final.py` later): written by the driver as `outcome.json` in the search
    folder (`save`, `load`).

    Args:
        dataset: the dataset's name (conf/datasets/<dataset>.yaml).
        metric: the selection metric, "cv_<name>" (the mean over validation folds).
        trials: every trial, scored or not (`TrialResult`).
        search_dir: the search's folder (`<runs-dir>/ray/<name>`); the MLflow runs carry it as
            `cfcml.search`.
        prepared_dir: the prepared dataset the trials trained on.
        tracking_uri: the MLflow store of the search's runs.
        experiment_id: its MLflow experiment (`cfcml-<dataset>`).
        parent_run_id: the search's parent run; trials, the final model and the ensemble are its children.
        searched: the dotted keys of the search space, in the search file's order.
        objectives: a multi-objective search's objectives (metric names, the primary first: the
            search file's `objectives`); empty for a search on `metric` alone. With two or more,
            `best` is the point of the `front` that `FRONT_RULE` picks.
    """

    dataset: str
    metric: str
    trials: list[TrialResult]
    search_dir: str
    prepared_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    searched: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=list)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def modes(self) -> list[str]:
        """"max" or "min" per objective (`cfcml.evaluation.metric_keys.objective_mode`)."""
        return [metric_keys.objective_mode(name) for name in self.objectives]

    def objective_values(self, trial: TrialResult) -> list[float] | None:
        """The trial's `cv_<objective>` values at its selected epoch, None if one is missing or NaN."""
        values = [trial.metrics.get(metric_keys.cv(name)) for name in self.objectives]
        return [float(v) for v in values if _finite(v)] if all(_finite(v) for v in values) else None

    @property
    def front(self) -> list[TrialResult]:
        """A multi-objective search's Pareto front: the scored trials with a finite value of every
        objective that no other such trial dominates (`pareto_front`), in trial order; empty for a
        single-objective search."""
        if not self.multi_objective:
            return []
        candidates = [(t, v) for t in self.trials if t.scored and (v := self.objective_values(t)) is not None]
        return [candidates[i][0] for i in pareto_front([v for _, v in candidates], self.modes)]

    @property
    def best(self) -> TrialResult | None:
        """The trial the search retrains and registers, None when no trial scored. A
        single-objective search: the scored trial with the highest `score` (ties: the first). A
        multi-objective one: the front point `nearest_to_ideal` picks (`FRONT_RULE`); the highest
        `score` when no trial has a finite value of every objective."""
        scored = [t for t in self.trials if t.scored]
        front = self.front
        if front:
            return front[nearest_to_ideal([self.objective_values(t) or [] for t in front], self.modes)]
        return max(scored, key=lambda t: t.score) if scored else None  # type: ignore[arg-type,return-value]

    def save(self, path: str | Path | None = None) -> Path:
        """Write the outcome as JSON (atomically: a temporary file, then renamed).

        Args:
            path: the file; None: `OUTCOME_FILE` in `search_dir`.

        Returns:
            The file written.
        """
        path = Path(path) if path else Path(self.search_dir) / OUTCOME_FILE
        data = dataclasses.asdict(self)
        data["trials"] = [t.to_dict() for t in self.trials]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SearchOutcome:
        """Read an outcome file written by `save`.

        Raises:
            OSError: the file cannot be read; json.JSONDecodeError: it is not JSON;
            cfcml.config.ConfigError: a trial's recorded configuration is not a valid one.
        """
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["trials"] = [TrialResult.from_dict(t) for t in data["trials"]]
        return cls(**data)
