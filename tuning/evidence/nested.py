"""What nested cross-validation says (`search.py --outer-folds K`): the estimate, its table, its
console line and its record on the search's parent run.

Each outer fold's search chose a configuration on its outer-training patients only; its winner,
retrained on them, was scored once on the outer-held-out patients (`tuning.workflows.nested`).
The nested estimate of a metric is the mean over outer folds of those held-out figures: an estimate
of "CFCML as tuned by this search" on new patients of this cohort, free of the selection's
optimism (the ordinary search's `selected_cv_*` is a maximum over epochs and trials).

Its 95% CI is a percentile bootstrap over patients: each resample draws every outer fold's held-out
patients with replacement within that fold, scores each fold, and averages the folds (the same
statistic as the point estimate); resamples where a fold's metric is undefined are left out of that
metric's percentiles. It reflects the held-out patients' sampling, not the spread of the searches
themselves (each outer search ran once); the per-fold figures show that spread.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cfcml.evaluation import metric_keys
from cfcml.evaluation.metrics import Estimate, format_estimate

if TYPE_CHECKING:
    from tuning.records.outcome import SearchOutcome

N_BOOT = 1000
NESTED_TABLE = "nested_cv.md"  # the table artifact on the parent run
NESTED_RECORD = "nested_cv.json"  # the estimate and every outer fold, on the parent run


@dataclass(frozen=True)
class OuterFold:
    """One outer fold of nested cross-validation, as its search and its held-out scoring left it.

    Args:
        fold: the outer fold, 0-based.
        search: the outer search's name (`<name>-outer<k>`), its folder under `<runs-dir>/ray`.
        train_patients: outer-training patients (the outer search's development split).
        heldout_patients: outer-held-out patients (scored once).
        trial_id: the outer search's winner.
        epoch: its selected epoch (`EpochSelection`): the retrained model trains for that many epochs.
        params: its searched values, by dotted key.
        selected_score: its selection metric on the inner folds (selected: optimistic).
        metrics: `compute_metrics` names -> value on the outer-held-out patients.
    """

    fold: int
    search: str
    train_patients: int
    heldout_patients: int
    trial_id: str
    epoch: int
    params: dict[str, Any] = field(default_factory=dict)
    selected_score: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OuterFold:
        return cls(**data)


@dataclass(frozen=True)
class NestedEstimate:
    """The nested estimate: per metric, the mean over outer folds of the held-out figure with its
    bootstrap 95% CI (see the module docstring), and every outer fold.

    Args:
        metric: the selection metric of every search ("cv_<name>").
        estimates: metric name -> `Estimate`, the names of `metric_keys.headline_metrics` first.
        folds: the outer folds, in order.
        n_boot: bootstrap resamples of the CI.
    """

    metric: str
    estimates: dict[str, Estimate]
    folds: list[OuterFold]
    n_boot: int = N_BOOT

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics: `nested_<name>` with its CI bounds, and `nested_<name>_fold<k>`."""
        out: dict[str, float] = {}
        for name, e in self.estimates.items():
            key = metric_keys.nested(name)
            out.update({key: e.point, metric_keys.ci_low(key): e.low, metric_keys.ci_high(key): e.high})
            for f in self.folds:
                out[metric_keys.fold(key, f.fold)] = f.metrics.get(name, math.nan)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "n_boot": self.n_boot, "ci": CI_NOTE,
                "estimates": {k: [e.point, e.low, e.high] for k, e in self.estimates.items()},
                "folds": [f.to_dict() for f in self.folds]}


CI_NOTE = ("95% CI: percentile bootstrap over patients, resampled within each outer fold's held-out patients, "
           "of the mean over outer folds")


def nested_estimate(task: str, classes: Sequence[str], metric: str, folds: Sequence[OuterFold],
                    predictions: Sequence[pd.DataFrame], n_boot: int = N_BOOT, seed: int = 0) -> NestedEstimate:
    """Aggregate the outer folds.

    Args:
        task: "binary" | "multiclass".
        classes: the class names; `predictions` hold `prob_<class>` columns.
        metric: the selection metric ("cv_<name>").
        folds: the outer folds (their `metrics` are the point figures per fold).
        predictions: per outer fold (same order), its held-out predictions: `label` and `prob_<class>`
            per patient ([N_k] rows).
        n_boot: bootstrap resamples; seed: their seed.

    Returns:
        The `NestedEstimate` of every metric all folds report (headline metrics first).

    Raises:
        ValueError: no fold, or `folds` and `predictions` of different lengths.
    """
    from cfcml.evaluation.metrics import resample_weights, weighted_metrics

    if not folds or len(folds) != len(predictions):
        raise ValueError(f"the nested estimate needs one prediction set per outer fold; got {len(folds)} outer "
                         f"fold(s) and {len(predictions)} prediction set(s)")
    cols = [f"prob_{c}" for c in classes]
    headline = metric_keys.headline_metrics(task, len(classes))
    common = set.intersection(*(set(f.metrics) for f in folds))
    names = [n for n in headline if n in common] + sorted(common - set(headline))
    point = {n: float(np.mean([f.metrics[n] for f in folds])) for n in names}
    # per fold, n_boot resamples of its own patients (as `bootstrap_ci` draws them, seeded per fold);
    # resample b of the estimate is the mean over folds of each fold's resample b
    boots = []
    for k, p in enumerate(predictions):
        y = p["label"].to_numpy()
        boots.append(weighted_metrics(task, y, p[cols].to_numpy(dtype=np.float64),
                                       resample_weights(len(y), n_boot, seed + k)))
    estimates = {}
    for n in names:
        if not all(n in b for b in boots):  # a figure the vectorised resampling does not compute: no interval
            estimates[n] = Estimate(point[n])
            continue
        draws = np.mean([b[n] for b in boots], axis=0)  # NaN where any fold's resample left it undefined
        draws = draws[~np.isnan(draws)]
        low, high = np.percentile(draws, [2.5, 97.5]) if len(draws) else (math.nan, math.nan)
        estimates[n] = Estimate(point[n], float(low), float(high))
    return NestedEstimate(metric, estimates, list(folds), n_boot)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def nested_table(nested: NestedEstimate, outcome: SearchOutcome | None) -> list[str]:
    """Markdown: the nested estimate beside the ordinary search's selected and last-epoch figures
    (labelled), then every outer fold's chosen values and held-out figures."""
    best = outcome.best if outcome is not None else None
    k = len(nested.folds)
    lines = [f"Nested estimate: each of {k} outer folds ran the whole search on its outer-training patients and "
             f"scored its retrained winner once on its outer-held-out patients; mean over outer folds. {CI_NOTE} "
             f"({nested.n_boot} resamples). The ordinary search's figures beside it are its best trial's, on the "
             f"validation folds it was selected on: `selected` is a maximum over epochs and trials (optimistic), "
             f"`last epoch` is not maximised over epochs.", "",
             "| metric | nested (outer-held-out) [95% CI] | ordinary search, selected | ordinary search, last epoch |",
             "|---|---|---|---|"]
    for name, e in nested.estimates.items():
        sel = best.metrics.get(metric_keys.cv(name)) if best else None
        last = best.last_epoch_metrics.get(metric_keys.cv(name)) if best else None
        lines.append(f"| {name} | {format_estimate(e, 4)} | {_fmt(sel) if sel is not None else '-'} | "
                     f"{_fmt(last) if last is not None else '-'} |")
    keys = sorted({key for f in nested.folds for key in f.params})
    head = list(nested.estimates)[:2]
    lines += ["", "Each outer fold's choice (how stable the chosen values are):", "",
              "| outer fold | patients (training / held-out) | chosen trial | epoch | "
              f"inner selected {nested.metric} | " + " | ".join(f"held-out {n}" for n in head) +
              "".join(f" | {key}" for key in keys) + " |",
              "|" + "---|" * (5 + len(head) + len(keys))]
    for f in nested.folds:
        lines.append(f"| {f.fold} | {f.train_patients} / {f.heldout_patients} | {f.trial_id} | {f.epoch} | "
                     f"{_fmt(f.selected_score)} | " + " | ".join(_fmt(f.metrics.get(n, math.nan)) for n in head) +
                     "".join(f" | {_fmt(f.params.get(key, '-'))}" for key in keys) + " |")
    return lines


def nested_line(nested: NestedEstimate, outcome: SearchOutcome | None = None) -> str:
    """The console summary's line: the nested headline figures, beside the ordinary selected one."""
    parts = [f"{n} {format_estimate(e, 3)}" for n, e in list(nested.estimates.items())[:2]]
    best = outcome.best if outcome is not None else None
    beside = f" (ordinary search, selected: {outcome.metric} {best.score:.3f}, optimistic)" \
        if best is not None and outcome is not None and best.score is not None else ""
    return f"nested CV ({len(nested.folds)} outer folds, outer-held-out): {'; '.join(parts)}{beside}"


def log_nested(client: Any, run_id: str, nested: NestedEstimate, outcome: SearchOutcome | None) -> None:
    """On the search's parent run: the `nested_*` metrics, the table (`NESTED_TABLE`) and the record
    (`NESTED_RECORD`)."""
    from tuning.tracking.store import log_metrics, write_json_artifact

    log_metrics(client, run_id, {k: v for k, v in nested.metrics().items() if math.isfinite(v)})
    client.log_text(run_id, "\n".join(nested_table(nested, outcome)) + "\n", NESTED_TABLE)
    write_json_artifact(client, run_id, nested.to_dict(), NESTED_RECORD)
