"""Figures of the search report and the comparison (matplotlib `Figure`s, no pyplot state)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve


def _macro_roc(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One curve per model: the positive class's ROC (binary) or the macro average of the
    one-vs-rest curves on a common false-positive grid (multiclass), with its AUC."""
    if probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y == 1, probs[:, 1])
        return fpr, tpr, float(roc_auc_score(y == 1, probs[:, 1]))
    grid = np.linspace(0, 1, 201)
    curves, aucs = [], []
    for k in range(probs.shape[1]):
        positive = y == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        curves.append(np.interp(grid, fpr, tpr))
        aucs.append(roc_auc_score(positive, probs[:, k]))
    return grid, np.mean(curves, axis=0), float(np.mean(aucs))


def plot_roc_overlay(y_true: np.ndarray, probs: Mapping[str, np.ndarray], title: str) -> Figure:
    """ROC curves of several models on the same patients (macro average for multiclass)."""
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    for name, p in probs.items():
        fpr, tpr, auc = _macro_roc(np.asarray(y_true), np.asarray(p, dtype=float))
        ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})", linewidth=1.8 if name.startswith("cfcml") else 1.1,
                linestyle=":" if name == "oracle" else "-")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.legend(loc="lower right", fontsize="small", title="AUC")
    return fig


def plot_metric_bars(rows: Sequence[dict], metrics: Sequence[str], reference: Mapping[str, float] | None = None,
                     title: str = "") -> Figure:
    """Per model and metric: the test value with its 95% CI as a bar, the CV mean +- sd over
    seeds as a dot. rows: {"name", "test": {m: (point, low, high)}, "cv": {m: mean}, "cv_sd": {m: sd}};
    reference: a value per metric drawn as a line (the oracle)."""
    fig = Figure(figsize=(max(7.5, 1.1 * len(rows) * len(metrics) + 4), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for j, metric in enumerate(metrics):
        pos = x - 0.4 + width * (j + 0.5)
        point = np.array([r["test"].get(metric, (np.nan,) * 3)[0] for r in rows])
        low = np.array([r["test"].get(metric, (np.nan,) * 3)[1] for r in rows])
        high = np.array([r["test"].get(metric, (np.nan,) * 3)[2] for r in rows])
        err = np.vstack([np.clip(point - low, 0, None), np.clip(high - point, 0, None)])
        bars = ax.bar(pos, point, width, yerr=err, capsize=3, label=f"test {metric} (95% CI)", alpha=0.75)
        cv = np.array([r["cv"].get(metric, np.nan) for r in rows])
        sd = np.array([r.get("cv_sd", {}).get(metric, 0.0) for r in rows])
        ax.errorbar(pos, cv, yerr=sd, fmt="o", color="black", markersize=3, linewidth=0.8,
                    label="CV mean ± sd over seeds" if j == 0 else None)
        if reference and metric in reference:
            ax.axhline(reference[metric], color=bars.patches[0].get_facecolor(), linestyle=":", linewidth=1,
                       label=f"oracle {metric}")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=25, ha="right")
    ax.set(ylim=(0, 1.05), title=title)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_history(scores: Sequence[float], metric: str) -> Figure:
    """Optimisation history: every trial's score in the order the trials were proposed, and the
    best so far."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    s = np.asarray(scores, dtype=float)
    ax.plot(np.arange(1, len(s) + 1), s, "o", color="tab:blue", alpha=0.6, label="trial")
    ax.step(np.arange(1, len(s) + 1), np.fmax.accumulate(s), where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial (in the order proposed)", ylabel=metric, title="Optimisation history")
    ax.legend(fontsize="small")
    return fig


def plot_front(points: Sequence[Sequence[float]], front: Sequence[int], chosen: int | None,
               names: Sequence[str], modes: Sequence[str]) -> Figure:
    """A multi-objective search's trials on its first two objectives: every scored trial, the
    Pareto front highlighted (joined in order of the first objective) and the chosen point marked.

    Args:
        points: per trial, its objective values (at least two; the first two are drawn).
        front: indices into `points` of the front's trials.
        chosen: index into `points` of the trial the rule picked; None: none marked.
        names: the objectives' names (axis labels), in the order of the values.
        modes: "max" or "min" per objective (written on the axes: which way is better).
    """
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    p = np.asarray(points, dtype=float).reshape(len(points), -1)
    ax.plot(p[:, 0], p[:, 1], "o", color="tab:grey", alpha=0.5, label="trial")
    if len(front):
        f = p[sorted(front, key=lambda i: p[i, 0])]
        ax.plot(f[:, 0], f[:, 1], "o-", color="tab:blue", label="Pareto front")
    if chosen is not None:
        ax.plot(p[chosen, 0], p[chosen, 1], "*", color="tab:red", markersize=16, label="chosen (retrained)")
    better = {"max": "higher is better", "min": "lower is better"}
    ax.set(xlabel=f"{names[0]} ({better[modes[0]]})", ylabel=f"{names[1]} ({better[modes[1]]})",
           title="Objectives at each trial's selected epoch (CV)")
    ax.legend(fontsize="small")
    return fig


def plot_parallel_coordinates(params: Sequence[Mapping[str, float]], scores: Sequence[float], keys: Sequence[str],
                              log_keys: Sequence[str] = ()) -> Figure:
    """One line per trial across the searched parameters (scaled to [0, 1], log scale where the
    search was log-uniform), coloured by its score."""
    fig = Figure(figsize=(max(6.0, 1.3 * len(keys) + 2), 4.5))
    ax = fig.add_subplot()
    values = np.array([[float(p[k]) for k in keys] for p in params], dtype=float)
    for j, k in enumerate(keys):
        if k in log_keys:
            values[:, j] = np.log10(values[:, j])
    low, high = np.nanmin(values, 0), np.nanmax(values, 0)
    scaled = (values - low) / np.where(high > low, high - low, 1.0)
    s = np.asarray(scores, dtype=float)
    norm = (s - np.nanmin(s)) / max(np.nanmax(s) - np.nanmin(s), 1e-12)
    cmap = colormaps["viridis"]
    for row, c in sorted(zip(scaled, norm), key=lambda t: t[1]):
        ax.plot(range(len(keys)), row, color=cmap(c), alpha=0.8)
    ax.set_xticks(range(len(keys)), [k.split(".")[-1] for k in keys], rotation=20)
    ax.set(ylabel="scaled value (log where searched log-uniform)", title="Parallel coordinates (colour: score)")
    return fig


def plot_importance(importance: Mapping[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.45 * max(len(importance), 1) + 1.5))
    ax = fig.add_subplot()
    names = list(importance)[::-1]
    ax.barh([n.split(".")[-1] for n in names], [importance[n] for n in names], color="tab:green")
    ax.set(xlabel="importance (Optuna's default evaluator, normalised)", title="Parameter importance")
    fig.tight_layout()
    return fig
