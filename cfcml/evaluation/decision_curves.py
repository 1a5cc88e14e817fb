"""Decision curves (Vickers & Elkin 2006, "Decision curve analysis"): the net benefit of acting on a
model's probability at each threshold probability, against treating everyone and treating no one.

At threshold probability p_t (the risk at which a clinician would act: the odds p_t / (1 - p_t)
weigh a false positive against a true positive), acting on the patients whose probability of the
class is >= p_t has

    net benefit = TP / N - FP / N * p_t / (1 - p_t)

treat-all (everyone acted on) has prevalence - (1 - prevalence) * p_t / (1 - p_t), and treat-none
0. A model is useful at p_t where its curve lies above both. For a multiclass task each class has
its own curve, one-vs-rest; a binary task has the positive class's (index 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from cfcml.evaluation.metrics import _validate

DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 0.96, 0.01), 2)  # p_t = 1 has infinite odds


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of the model, of treat-all and of treat-none (0) per threshold probability, for
    class `class_name` (one-vs-rest) on `n` patients with prevalence `prevalence`."""

    class_name: str
    thresholds: np.ndarray  # [T] in [0, 1)
    model: np.ndarray  # [T]
    treat_all: np.ndarray  # [T]
    prevalence: float
    n: int


def _check_thresholds(thresholds) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0 or (t < 0).any() or (t >= 1).any():
        raise ValueError(f"thresholds must be a non-empty 1-D array in [0, 1); got {t}")
    return t


def net_benefit(positive, score, thresholds) -> np.ndarray:
    """Net benefit [T] of acting when `score` >= p_t, per threshold probability p_t in [0, 1).

    Args:
        positive: bool [N], the patients who have the condition (the class).
        score: float [N], the model's probability of it.
        thresholds: threshold probabilities [T], each in [0, 1).
    """
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    t = _check_thresholds(thresholds)
    if pos.shape != s.shape or pos.ndim != 1 or len(pos) == 0:
        raise ValueError(f"positive and score must be the same non-empty [N]; got {pos.shape} and {s.shape}")
    acted = s[None, :] >= t[:, None]  # [T, N]
    n = len(pos)
    tp = (acted & pos).sum(1) / n
    fp = (acted & ~pos).sum(1) / n
    return tp - fp * t / (1 - t)


def treat_all_net_benefit(prevalence: float, thresholds) -> np.ndarray:
    """prevalence - (1 - prevalence) * p_t / (1 - p_t) per threshold probability."""
    t = _check_thresholds(thresholds)
    return prevalence - (1 - prevalence) * t / (1 - t)


def decision_curves(y_true, probs, class_names, thresholds=DEFAULT_THRESHOLDS) -> list[DecisionCurve]:
    """One `DecisionCurve` per class one-vs-rest (binary: the positive class only)."""
    p = np.asarray(probs, dtype=np.float64)
    task = "binary" if p.ndim == 1 or p.shape[1] == 2 else "multiclass"
    y, p = _validate(task, y_true, p)
    t = _check_thresholds(thresholds)
    names = [str(c) for c in class_names]
    curves = []
    for k in ([1] if task == "binary" else range(p.shape[1])):
        positive = y == k
        prevalence = float(positive.mean())
        curves.append(DecisionCurve(names[k], t, net_benefit(positive, p[:, k], t),
                                    treat_all_net_benefit(prevalence, t), prevalence, len(y)))
    return curves


def plot_decision_curves(curves: list[DecisionCurve], title: str = "Decision curves") -> Figure:
    """One panel per class: the model's net benefit, treat-all and treat-none against the threshold
    probability (the y axis from a little below 0 to the prevalence, where the curves live)."""
    fig = Figure(figsize=(4.5 * len(curves), 4.3), layout="constrained")
    for i, c in enumerate(curves):
        ax = fig.add_subplot(1, len(curves), i + 1)
        ax.plot(c.thresholds, c.model, label="model")
        ax.plot(c.thresholds, c.treat_all, linestyle="--", label="treat all")
        ax.axhline(0.0, color="grey", linewidth=0.8, label="treat none")
        top = max(c.prevalence, float(np.nanmax(c.model)), 0.01)
        ax.set(xlim=(0, float(c.thresholds.max())), ylim=(-0.05 - 0.1 * top, 1.1 * top),
               xlabel="threshold probability", ylabel="net benefit",
               title=f"{c.class_name}\nprevalence {c.prevalence:.2f}, n = {c.n}")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig
