"""Calibration: Brier score, expected calibration error, reliability diagrams and temperature scaling.

- Brier score: the mean squared distance between the probability vector and the one-hot label,
  sum over classes (Brier 1950); for a binary task scikit-learn's `brier_score_loss` of the
  positive class, which is half the two-class sum. Lower is better; 0 is perfect.
- Expected calibration error (ECE, Naeini et al. 2015; Guo et al. 2017, "On calibration of modern
  neural networks"): the top-label form. Each patient's confidence is its largest class
  probability and its outcome whether that class is the true one; confidences are put in
  `n_bins` equal-width bins over [0, 1] (bin i = [i/M, (i+1)/M), the last one closed), and ECE =
  sum over bins of (patients in bin / N) * |mean outcome - mean confidence|. 0 for a calibrated
  model; the bins are part of the figure and reported with it (default 10).
- Temperature scaling (Guo et al. 2017): one scalar T > 0 dividing the logits, fitted by
  minimising the negative log-likelihood of held-out predictions; it changes no argmax and no
  ranking (AUC), only how confident the probabilities are. Log-probabilities are logits up to a
  per-row constant that softmax removes, so it is fitted and applied on log-probabilities as well.
  The fit is scipy's bounded scalar minimiser over log T in [log 0.05, log 20].

Confidence intervals reuse `cfcml.evaluation.metrics.resample_weights` (the patients resampled by
`bootstrap_ci`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from cfcml.evaluation.metrics import _validate, percentile_ci, resample_weights

DEFAULT_BINS = 10
LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))
EPS = 1e-12  # probabilities are clipped to [EPS, 1] before a log: a stored 0 stays finite


def _probs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    task = "binary" if p.ndim == 1 or p.shape[1] == 2 else "multiclass"
    return _validate(task, y_true, p)


def brier_per_sample(y_true, probs) -> np.ndarray:
    """Per patient, float [N]: sum over classes of (p_k - 1[y = k])^2, halved for two classes (so
    its mean is scikit-learn's binary `brier_score_loss` of the positive class)."""
    y, p = _probs(y_true, probs)
    onehot = np.eye(p.shape[1])[y]
    per = ((p - onehot) ** 2).sum(1)
    return per / 2 if p.shape[1] == 2 else per


def brier_score(y_true, probs) -> float:
    """Brier score (see the module doc): y_true int [N], probs [N, C] or the positive class [N]."""
    y, p = _probs(y_true, probs)
    if p.shape[1] == 2:
        from sklearn.metrics import brier_score_loss

        return float(brier_score_loss(y, p[:, 1]))
    return float(brier_per_sample(y, p).mean())


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)


def _top_label(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y, p = _probs(y_true, probs)
    return p.max(1), (p.argmax(1) == y).astype(np.float64)


def expected_calibration_error(y_true, probs, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE over `n_bins` equal-width confidence bins (see the module doc), in [0, 1].

    Args:
        y_true: int class indices [N].
        probs: [N, C] probabilities (binary: [N, 2] or the positive class [N]).
        n_bins: number of equal-width bins over [0, 1], >= 1.
    Raises ValueError for bad shapes, labels or n_bins.
    """
    return float(_weighted_ece(*_top_label(y_true, probs), np.ones((1, len(np.asarray(y_true)))), n_bins)[0])


def _weighted_ece(confidence: np.ndarray, correct: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE for each row of patient weights w [R, N] (a bootstrap resample)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    member = np.eye(n_bins)[_bin_index(confidence, n_bins)]  # [N, M]
    gap = (w * (correct - confidence)) @ member  # [R, M]: sum over the bin of outcome - confidence
    return np.abs(gap).sum(1) / w.sum(1)


@dataclass(frozen=True)
class CalibrationSummary:
    """Brier score and ECE of one prediction set, each as (point, low, high) with a percentile
    bootstrap 95% CI over patients; `n_bins` the ECE's equal-width bins."""

    n: int
    n_bins: int
    brier: tuple[float, float, float]
    ece: tuple[float, float, float]
    nll: float  # mean negative log-likelihood of the true class (probabilities clipped at 1e-12)


def negative_log_likelihood(y_true, probs) -> float:
    """Mean -log p(true class), probabilities clipped to [1e-12, 1]."""
    y, p = _probs(y_true, probs)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0)).mean())


def calibration_summary(y_true, probs, n_bins: int = DEFAULT_BINS, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> CalibrationSummary:
    """Brier score and ECE with bootstrap CIs (the resamples of `cfcml.evaluation.metrics.bootstrap_ci` for the
    same n, n_boot and seed)."""
    y, p = _probs(y_true, probs)
    w = resample_weights(len(y), n_boot, seed)
    per = brier_per_sample(y, p)
    brier = percentile_ci(brier_score(y, p), (w @ per) / w.sum(1), alpha)
    conf, correct = _top_label(y, p)
    ece = percentile_ci(expected_calibration_error(y, p, n_bins), _weighted_ece(conf, correct, w, n_bins), alpha)
    return CalibrationSummary(len(y), n_bins, brier, ece, negative_log_likelihood(y, p))


def paired_brier_diff(y_true, probs_a, probs_b, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """Brier(a) - Brier(b) on the same patients, with a paired percentile bootstrap CI (the resamples
    of `cfcml.evaluation.metrics.paired_bootstrap_diff` for the same n, n_boot and seed). Negative:
    `a` is better calibrated and sharper (the Brier score is lower-is-better).

    Args:
        y_true: int [N] class indices.
        probs_a, probs_b: [N, C] (or the positive class [N]) probabilities of two models, same patients.
        n_boot: resamples; seed: their seed; alpha: 0.05 gives a 95% CI.

    Returns:
        (difference, low, high).

    Raises:
        ValueError: the two prediction sets differ in shape, or either does not fit `y_true`.
    """
    y, a = _probs(y_true, probs_a)
    _, b = _probs(y_true, probs_b)
    if a.shape != b.shape:
        raise ValueError(f"probs_a and probs_b differ in shape: {a.shape} vs {b.shape}")
    w = resample_weights(len(y), n_boot, seed)
    per = brier_per_sample(y, a) - brier_per_sample(y, b)
    return percentile_ci(brier_score(y, a) - brier_score(y, b), (w @ per) / w.sum(1), alpha)


def reliability_curve(y_true, probs, n_bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, patients) per non-empty equal-width bin of the top-label
    confidence: the points of a reliability diagram. scikit-learn's `calibration_curve` (uniform
    strategy) gives the same points; the counts are added for the bar of patients per bin."""
    conf, correct = _top_label(y_true, probs)
    idx = _bin_index(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    seen = counts > 0
    mean_conf = np.bincount(idx, weights=conf, minlength=n_bins)[seen] / counts[seen]
    accuracy = np.bincount(idx, weights=correct, minlength=n_bins)[seen] / counts[seen]
    return mean_conf, accuracy, counts[seen]


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int = DEFAULT_BINS,
                     title: str = "Reliability diagram") -> Figure:
    """One reliability diagram with a curve per named prediction set, e.g. {"test, raw": (y, probs),
    "test, T = 1.4": (y, probs_calibrated)}: accuracy against mean confidence per bin, with each
    set's ECE in its label and the diagonal of perfect calibration."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfectly calibrated")
    for name, (y, probs) in curves.items():
        conf, acc, counts = reliability_curve(y, probs, n_bins)
        ece = expected_calibration_error(y, probs, n_bins)
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {ece:.3f}, n = {int(counts.sum())})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=f"confidence (top-label probability; {n_bins} equal-width bins)",
           ylabel="accuracy in the bin", title=title)
    ax.legend(loc="upper left", fontsize="small")
    return fig


@dataclass(frozen=True)
class Temperature:
    """A fitted temperature: probabilities become softmax(log p / t). `nll_before` and `nll_after`
    are the mean negative log-likelihoods on the predictions it was fitted on, `n` their count."""

    t: float
    nll_before: float
    nll_after: float
    n: int

    def apply(self, probs) -> np.ndarray:
        return apply_temperature(probs, self.t)


def apply_temperature(probs, t: float) -> np.ndarray:
    """softmax(log(probs) / t) row-wise, float64 [N, C]; `probs` [N, C] (rows summing to 1).
    Equal to softmax(logits / t) for the logits the probabilities came from. t > 0; t = 1 is the
    identity, t > 1 softens, t < 1 sharpens. Raises ValueError for t <= 0 or a non-2D input."""
    if not t > 0:
        raise ValueError(f"temperature must be > 0; got {t}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C]; got {p.shape}")
    z = np.log(np.clip(p, EPS, 1.0)) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(y_true, probs) -> Temperature:
    """The temperature minimising the mean negative log-likelihood of `probs` (held-out
    predictions: the best trial's out-of-fold ones, never test rows), searched over log T in
    [log 0.05, log 20] by `scipy.optimize.minimize_scalar` (bounded). Returns T = 1 when that does
    not lower the likelihood (the fit never makes it worse).

    Args:
        y_true: int class indices [N].
        probs: [N, C] probabilities.
    """
    from scipy.optimize import minimize_scalar

    y, p = _probs(y_true, probs)
    logp = np.log(np.clip(p, EPS, 1.0))
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[rows, y]).mean())

    before = nll(0.0)
    res = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    if not res.success or res.fun >= before:
        return Temperature(1.0, before, before, len(y))
    return Temperature(float(np.exp(res.x)), before, float(res.fun), len(y))
