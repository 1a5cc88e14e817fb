"""Operating points: decision thresholds on one class's probability, fitted on held-out (out-of-fold)
predictions, and the sensitivity, specificity, PPV and NPV they give on other patients.

A threshold t on class k's probability decides "k" for a patient when p_k >= t (one-vs-rest; for a
binary task k is the positive class, index 1). Two kinds are fitted per class from the ROC curve
of the fitting predictions (scikit-learn's `roc_curve`, whose thresholds are the distinct scores):

- `sensitivity_<target>`: the highest threshold whose sensitivity reaches `target` (e.g. 0.90): as
  specific as possible while missing at most 1 - target of the positives (a rule-out threshold);
- `youden`: the threshold maximising Youden's J = sensitivity + specificity - 1 (Youden 1950),
  the highest one among ties.

Evaluated on other patients (the test split), each threshold gives sensitivity TP/(TP+FN),
specificity TN/(TN+FP), PPV TP/(TP+FP) and NPV TN/(TN+FN), each with a percentile bootstrap 95% CI
over patients (the resamples of `cfcml.evaluation.metrics.bootstrap_ci`); a ratio with an empty denominator is
NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfcml.evaluation.metrics import _validate, percentile_ci, resample_weights

RATES = ("sensitivity", "specificity", "ppv", "npv")


@dataclass(frozen=True)
class OperatingPoint:
    """A fitted threshold on the probability of class `class_index` (`class_name`); `kind` is
    "sensitivity" (with its `target`) or "youden". `fit_sensitivity` and `fit_specificity` are what
    it reached on the predictions it was fitted on (`n_fit` patients)."""

    name: str  # e.g. "sensitivity_0.90" or "youden"
    kind: str
    class_index: int
    class_name: str
    threshold: float
    target: float | None
    fit_sensitivity: float
    fit_specificity: float
    n_fit: int

    @property
    def key(self) -> str:
        """The name a caller picks it by: '<name>' for a binary task's positive class is ambiguous
        across classes, so always '<class>:<name>'."""
        return f"{self.class_name}:{self.name}"

    def decide(self, probs) -> np.ndarray:
        """bool [N]: p[:, class_index] >= threshold."""
        p = np.asarray(probs, dtype=np.float64)
        return p[:, self.class_index] >= self.threshold

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sensitivity_name(target: float) -> str:
    return f"sensitivity_{target:.2f}"


def _roc(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(positive, score, drop_intermediate=False)
    keep = np.isfinite(thr)  # the first threshold is +inf (nobody positive): not a usable decision
    return fpr[keep], tpr[keep], thr[keep]


def fit_operating_points(y_true, probs, class_names, target_sensitivity: float = 0.9,
                         skip_unfittable: bool = False) -> list[OperatingPoint]:
    """Per class one-vs-rest (binary: the positive class only), the `sensitivity_<target>` and the
    `youden` thresholds fitted on (y_true, probs) (see the module doc).

    Args:
        y_true: int class indices [N] of the fitting predictions (out-of-fold, never test).
        probs: [N, C] probabilities (binary [N, 2]).
        class_names: C names.
        target_sensitivity: in (0, 1].
        skip_unfittable: leave out a class with no positive or no negative patient among the
            fitting predictions instead of raising.
    Raises ValueError for a target outside (0, 1], bad shapes, or (unless skip_unfittable) a class
    with no positive or no negative patient among the fitting predictions (no threshold can be
    fitted for it).
    """
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1]; got {target_sensitivity}")
    p = np.asarray(probs, dtype=np.float64)
    task = "binary" if p.ndim == 1 or p.shape[1] == 2 else "multiclass"
    y, p = _validate(task, y_true, p)
    names = [str(c) for c in class_names]
    if len(names) != p.shape[1]:
        raise ValueError(f"class_names has {len(names)} names for {p.shape[1]} classes")
    points = []
    for k in ([1] if task == "binary" else range(p.shape[1])):
        positive = y == k
        if positive.all() or not positive.any():
            if skip_unfittable:
                continue
            raise ValueError(f"class {names[k]!r}: the fitting predictions need positives and negatives "
                             f"(have {int(positive.sum())} of {len(y)})")
        fpr, tpr, thr = _roc(positive, p[:, k])
        i = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])  # thresholds descend: the highest
        points.append(OperatingPoint(sensitivity_name(target_sensitivity), "sensitivity", k, names[k],
                                     float(thr[i]), float(target_sensitivity), float(tpr[i]), float(1 - fpr[i]),
                                     len(y)))
        j = int(np.argmax(tpr - fpr))  # first maximum = the highest threshold among ties
        points.append(OperatingPoint("youden", "youden", k, names[k], float(thr[j]), None, float(tpr[j]),
                                     float(1 - fpr[j]), len(y)))
    return points


def _weighted_rates(positive: np.ndarray, decided: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV for each row of patient weights w [R, N]."""
    positive, decided = positive.astype(bool), decided.astype(bool)
    tp = w @ (positive & decided)
    fn = w @ (positive & ~decided)
    fp = w @ (~positive & decided)
    tn = w @ (~positive & ~decided)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
                "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
                "ppv": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
                "npv": np.where(tn + fn > 0, tn / (tn + fn), np.nan)}


@dataclass(frozen=True)
class OperatingPointResult:
    """An operating point evaluated on `n` patients: each rate as (point, low, high) with a
    percentile bootstrap CI; `positives` how many of the n belong to the class."""

    point: OperatingPoint
    n: int
    positives: int
    rates: dict[str, tuple[float, float, float]]


def evaluate_operating_point(point: OperatingPoint, y_true, probs, n_boot: int = 1000, seed: int = 0,
                             alpha: float = 0.05) -> OperatingPointResult:
    """Sensitivity, specificity, PPV and NPV of `point`'s decision on (y_true, probs), with
    bootstrap CIs over patients (undefined resamples left out)."""
    p = np.asarray(probs, dtype=np.float64)
    task = "binary" if p.ndim == 1 or p.shape[1] == 2 else "multiclass"
    y, p = _validate(task, y_true, p)
    positive = y == point.class_index
    decided = point.decide(p)
    values = _weighted_rates(positive, decided, np.ones((1, len(y))))
    boot = _weighted_rates(positive, decided, resample_weights(len(y), n_boot, seed))
    rates = {r: percentile_ci(float(values[r][0]), boot[r], alpha) for r in RATES}
    return OperatingPointResult(point, len(y), int(positive.sum()), rates)
