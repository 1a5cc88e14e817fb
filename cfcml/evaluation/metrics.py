"""Evaluation metrics of the public code (docs/evaluation.md), bootstrap CIs and plots.

Two tasks:
- "multiclass" (MEN): accuracy, per-class accuracy (recall) "acc_class_<i>", balanced accuracy
  (their mean over the classes present), weighted and macro F1, macro one-vs-rest AUC;
- "binary" (Derm7pt, positive class = index 1): sensitivity, specificity, accuracy, G-mean,
  balanced accuracy, AUPRC (average precision), AUC.

Predictions are the argmax of the probabilities. Undefined metrics are NaN, never an exception:
recall of a class absent from y_true, AUC / AUPRC with a single class in y_true; the macro AUC
averages over the classes with both positives and negatives in y_true.

`compute_metrics` uses scikit-learn. `bootstrap_ci` evaluates all resamples at once with a
weighted (resample-count) implementation of the same metrics; the tests check that both agree.

`Estimate` is a figure with its confidence interval, and `format_estimate` the one way every
interval the platform prints is written ("0.812 [0.744, 0.871]").
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cfcml.evaluation import metric_keys

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TASKS = ("multiclass", "binary")


def selection_key(task: str, num_classes: int, dataset_metric: str, override: str | None = None) -> str:
    """"cv_<metric>": the mean validation metric over folds that model selection maximises.

    override: `train.selection_metric` (None: the dataset's). Raises ConfigError for a name the
    task does not have.
    """
    from cfcml.config import ConfigError

    name = override or dataset_metric
    known = metric_names(task, num_classes)
    if name not in known:
        key = "train.selection_metric" if override else "selection_metric (dataset spec)"
        raise ConfigError(f"{name!r} is not a {task} metric (known: {', '.join(known)})", key)
    return metric_keys.cv(name)


def metric_names(task: str, num_classes: int) -> tuple[str, ...]:
    """The names `compute_metrics` returns for `task` (what a selection metric may be)."""
    if task == "multiclass":
        return ("accuracy", *(f"acc_class_{k}" for k in range(num_classes)), "balanced_accuracy",
                "f1_weighted", "f1_macro", "macro_auc")
    if task == "binary":
        return ("sensitivity", "specificity", "accuracy", "g_mean", "balanced_accuracy", "auprc", "auc")
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


def _validate(task: str, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if task == "binary" and p.ndim == 1:  # probability of the positive class only
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"y_true must be [N] and probs [N, C]; got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("y_true is empty")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"y_true must hold integer class indices; got {y.dtype}")
        y = y.astype(np.int64)
    C = p.shape[1]
    if task == "binary" and C != 2:
        raise ValueError(f"binary task needs probs [N, 2]; got {p.shape}")
    if C < 2:
        raise ValueError(f"probs needs at least 2 classes; got {p.shape}")
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"y_true holds labels outside [0, {C}): {sorted(set(y[(y < 0) | (y >= C)].tolist()))}")
    if not np.isfinite(p).all():
        raise ValueError("probs holds NaN or inf")
    return y, p


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # scikit-learn where metrics are computed, not on import

    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, score))


def compute_metrics(task: str, y_true, probs) -> dict[str, float]:
    """Metrics of one prediction set: y_true int [N], probs [N, C] (binary: [N, 2] or [N])."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
    )

    y, p = _validate(task, y_true, probs)
    C = p.shape[1]
    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, labels=np.arange(C))  # [true, pred]
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(cm) / support, np.nan)
    if task == "multiclass":
        out = {"accuracy": float(accuracy_score(y, pred))}
        out |= {f"acc_class_{k}": float(recall[k]) for k in range(C)}
        with warnings.catch_warnings():  # a class absent from y_true: sklearn warns, the mean skips it
            warnings.simplefilter("ignore")
            out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        out["f1_weighted"] = float(f1_score(y, pred, average="weighted", zero_division=0))
        out["f1_macro"] = float(f1_score(y, pred, average="macro", zero_division=0))
        aucs = [_binary_auc(y == k, p[:, k]) for k in range(C)]
        out["macro_auc"] = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")
        return out
    sens, spec = float(recall[1]), float(recall[0])
    with warnings.catch_warnings():  # single class in y_true: sklearn warns, the value is defined
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, pred))
    both = 0 < y.sum() < len(y)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "accuracy": float(accuracy_score(y, pred)),
        "g_mean": float(np.sqrt(sens * spec)),
        "balanced_accuracy": balanced,
        "auprc": float(average_precision_score(y, p[:, 1])) if both else float("nan"),
        "auc": _binary_auc(y == 1, p[:, 1]),
    }


# ---- weighted metrics: every bootstrap resample at once, as counts per sample ----------------


def _weighted_ranking(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC and average precision for each row of sample weights w [R, N]; NaN without both classes."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores, ascending
    w_pos = np.add.reduceat((w * positive)[:, order], starts, axis=1)  # [R, K]
    w_neg = np.add.reduceat((w * ~positive)[:, order], starts, axis=1)
    n_pos, n_neg = w_pos.sum(1), w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.cumsum(w_neg, axis=1) - w_neg  # negatives scored strictly lower
        auc = (w_pos * (below + 0.5 * w_neg)).sum(1) / (n_pos * n_neg)
        tp = np.cumsum(w_pos[:, ::-1], axis=1)  # thresholds from the highest score down
        fp = np.cumsum(w_neg[:, ::-1], axis=1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        ap = (w_pos[:, ::-1] * precision).sum(1) / n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    return np.where(defined, auc, np.nan), np.where(defined, ap, np.nan)


def weighted_metrics(task: str, y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """`compute_metrics` for each row of sample counts w [R, N] (a resample), vectorised."""
    C = p.shape[1]
    pred = p.argmax(1)
    cells = np.zeros((len(y), C * C))
    cells[np.arange(len(y)), y * C + pred] = 1.0
    cm = (w @ cells).reshape(-1, C, C)  # [R, true, pred]
    tp = np.diagonal(cm, axis1=1, axis2=2)  # [R, C]
    support, predicted = cm.sum(2), cm.sum(1)
    total = support.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        accuracy = tp.sum(1) / total
        if task == "multiclass":
            f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
            seen = (support + predicted) > 0  # sklearn's macro F1 averages over labels seen
            out = {"accuracy": accuracy}
            out |= {f"acc_class_{k}": recall[:, k] for k in range(C)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["balanced_accuracy"] = np.nanmean(recall, axis=1)
            out["f1_weighted"] = (f1 * support).sum(1) / total
            out["f1_macro"] = (f1 * seen).sum(1) / seen.sum(1)
            aucs = np.stack([_weighted_ranking(y == k, p[:, k], w)[0] for k in range(C)], axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN
                out["macro_auc"] = np.nanmean(aucs, axis=1)
            return out
        sens, spec = recall[:, 1], recall[:, 0]
        auc, ap = _weighted_ranking(y == 1, p[:, 1], w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            balanced = np.nanmean(recall, axis=1)  # sklearn: mean recall over classes in y_true
        return {
            "sensitivity": sens,
            "specificity": spec,
            "accuracy": accuracy,
            "g_mean": np.sqrt(sens * spec),
            "balanced_accuracy": balanced,
            "auprc": ap,
            "auc": auc,
        }


MISSING = "—"  # what a figure that does not exist (None, NaN) is printed as


@dataclass(frozen=True)
class Estimate:
    """A figure and its confidence interval, e.g. a test AUC with its bootstrap 95% CI.

    `bootstrap_ci`, `paired_bootstrap_diff` and `percentile_ci` return the same three numbers as a
    `(point, low, high)` tuple; `Estimate.of` reads one. Printed by `format_estimate`, also as
    `f"{estimate:.4f}"` (any fixed-point spec, "+" for a sign: `f"{diff:+.3f}"`).

    Args:
        point: the estimate (NaN when undefined, e.g. an AUC on one class).
        low: the interval's lower bound; NaN when there is none (no resample defined the figure).
        high: the interval's upper bound; NaN when `low` is.
    """

    point: float
    low: float = math.nan
    high: float = math.nan

    @classmethod
    def of(cls, value: Estimate | Sequence[float]) -> Estimate:
        """`value` as an Estimate: an Estimate as it is, a `(point, low, high)` sequence read in order.

        Raises:
            ValueError: a sequence of another length than 3.
        """
        if isinstance(value, Estimate):
            return value
        if len(value) != 3:
            raise ValueError(f"an estimate is (point, low, high); got {len(value)} number(s): {tuple(value)!r}")
        return cls(float(value[0]), float(value[1]), float(value[2]))

    @property
    def has_interval(self) -> bool:
        """Whether both bounds exist (neither is NaN)."""
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def width(self) -> float:
        """high - low (NaN without an interval)."""
        return self.high - self.low

    def __format__(self, spec: str) -> str:
        match = re.fullmatch(r"(\+)?(?:\.(\d+))?f?", spec)
        if match is None:
            raise ValueError(f"Estimate format {spec!r}: expected a fixed-point spec such as '.3f' or '+.4f'")
        digits = 3 if match.group(2) is None else int(match.group(2))
        return format_estimate(self, digits, signed=match.group(1) is not None)


def format_number(value: float | None, digits: int = 3, *, signed: bool = False) -> str:
    """`value` in fixed point with `digits` decimals ("+" first when `signed`), `MISSING` ("—") for
    None or NaN: how a figure is printed on its own and inside `format_estimate`."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:{'+' if signed else ''}.{digits}f}"


def format_estimate(estimate: Estimate | Sequence[float], digits: int = 3, *, signed: bool = False,
                    interval_only: bool = False) -> str:
    """The one way an estimate is printed: "point [low, high]", each by `format_number`.

    Args:
        estimate: an `Estimate`, or a `(point, low, high)` tuple as `bootstrap_ci` returns it.
        digits: decimals of every number (3 in tables and the model card, 4 in the search report
            and the model version's tags).
        signed: a sign before every number (differences between models: "+0.012 [-0.020, +0.041]").
        interval_only: only "[low, high]", for a table whose point has a column of its own.

    Returns:
        "0.812 [0.744, 0.871]"; the point alone ("0.812") when the interval has a NaN bound;
        "—" when the point is NaN (and, with `interval_only`, when there is no interval).
    """
    est = Estimate.of(estimate)
    interval = f"[{format_number(est.low, digits, signed=signed)}, {format_number(est.high, digits, signed=signed)}]"
    if interval_only:
        return interval if est.has_interval else MISSING
    point = format_number(est.point, digits, signed=signed)
    if math.isnan(est.point) or not est.has_interval:
        return point
    return f"{point} {interval}"


def resample_weights(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of n patients as counts: float [n_boot, n], row r holding how often each
    patient was drawn (with replacement, n draws) in resample r. Seeded; the same (n, n_boot, seed)
    gives the same resamples, so figures computed on them are paired."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1; got n={n}, n_boot={n_boot}")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    return counts.reshape(n_boot, n).astype(np.float64)


def percentile_ci(point: float, values: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high): the percentile interval of the resampled `values`, NaN ones left out
    (NaN bounds when none is defined)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float(point), float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(point), float(low), float(high)


def bootstrap_ci(
    task: str, y_true, probs, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float, float]]:
    """(point estimate, low, high) per metric: percentile bootstrap over patients.

    Patients are resampled with replacement (n_boot resamples, seeded); resamples where a
    metric is undefined (NaN) are left out of its percentiles.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1; got n_boot={n_boot}, alpha={alpha}")
    y, p = _validate(task, y_true, probs)
    point = compute_metrics(task, y, p)
    boot = weighted_metrics(task, y, p, resample_weights(len(y), n_boot, seed))
    out = {}
    for name, value in point.items():
        values = boot[name]
        values = values[~np.isnan(values)]
        if len(values) == 0:
            out[name] = (value, float("nan"), float("nan"))
            continue
        low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[name] = (value, float(low), float(high))
    return out


def class_aucs(y_true, probs) -> list[float]:
    """One-vs-rest AUC of every class: y_true int [N], probs [N, C] -> C floats, class k ranking
    `probs[:, k]` of its patients against everyone else's; NaN for a class absent from y_true or
    the only one present."""
    y, p = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    return [_binary_auc(y == k, p[:, k]) for k in range(p.shape[1])]


def class_auc_ci(task: str, y_true, probs, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> list[tuple[float, float, float]]:
    """One-vs-rest AUC of every class with its percentile bootstrap CI: [(point, low, high)] * C.

    Class k's AUC ranks `probs[:, k]` of its patients against everyone else's (for a binary task
    both classes give the task's AUC). Same resamples as `bootstrap_ci` (same n, n_boot, seed), so
    the figures pair with it. A class absent from `y_true` (or the only one present) is NaN.
    Raises ValueError as `compute_metrics` does for bad shapes or labels.
    """
    y, p = _validate(task, y_true, probs)
    w = resample_weights(len(y), n_boot, seed)
    out = []
    for k in range(p.shape[1]):
        point = _binary_auc(y == k, p[:, k])
        out.append(percentile_ci(point, _weighted_ranking(y == k, p[:, k], w)[0], alpha))
    return out


def paired_bootstrap_diff(
    task: str, y_true, probs_a, probs_b, metric: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """metric(a) - metric(b) on the same patients, with a paired percentile bootstrap CI.

    Each resample draws patients with replacement and scores both prediction sets on that same
    resample, so the CI reflects the difference between the models, not the spread of the cohort.
    Returns (difference, low, high); NaN bounds when no resample defines the metric.
    """
    y, a = _validate(task, y_true, probs_a)
    _, b = _validate(task, y_true, probs_b)
    if a.shape != b.shape:
        raise ValueError(f"probs_a and probs_b differ in shape: {a.shape} vs {b.shape}")
    point = compute_metrics(task, y, a)[metric] - compute_metrics(task, y, b)[metric]
    w = resample_weights(len(y), n_boot, seed)
    diff = weighted_metrics(task, y, a, w)[metric] - weighted_metrics(task, y, b, w)[metric]
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0:
        return float(point), float("nan"), float("nan")
    low, high = np.percentile(diff, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(point), float(low), float(high)


# ---- plots --------------------------------------------------------------------------------


def _check_names(class_names, C: int) -> list[str]:
    names = [str(n) for n in class_names]
    if len(names) != C:
        raise ValueError(f"class_names has {len(names)} names for {C} classes: {names}")
    return names


def plot_roc(y_true, probs, class_names) -> Figure:
    """ROC curves: one-vs-rest per class (multiclass) or of the positive class (binary)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    probs = np.asarray(probs, dtype=np.float64)
    task = "binary" if probs.ndim == 1 or probs.shape[1] == 2 else "multiclass"
    y, p = _validate(task, y_true, probs)
    class_names = _check_names(class_names, p.shape[1])
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    curves = [1] if task == "binary" else range(p.shape[1])
    for k in curves:
        positive = y == k
        name = class_names[k]
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} (AUC undefined: one class)")
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC = {roc_auc_score(positive, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate", title="ROC")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_confusion(y_true, probs, class_names) -> Figure:
    """Confusion matrix of argmax predictions, counts annotated (rows: true, columns: predicted)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    probs = np.asarray(probs, dtype=np.float64)
    task = "binary" if probs.ndim == 1 else "multiclass"
    y, p = _validate(task, y_true, probs)
    C = p.shape[1]
    class_names = _check_names(class_names, C)
    cm = confusion_matrix(y, p.argmax(1), labels=np.arange(C))
    fig = Figure(figsize=(1.2 * C + 2.5, 1.2 * C + 2))
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    for (i, j), count in np.ndenumerate(cm):
        color = "white" if count > cm.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set(
        xticks=range(C), yticks=range(C), xticklabels=class_names, yticklabels=class_names,
        xlabel="Predicted", ylabel="True", title="Confusion matrix",
    )
    ax.tick_params(axis="x", labelrotation=30)
    return fig
