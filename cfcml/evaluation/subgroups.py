"""Performance per subgroup: every metric of `cfcml.evaluation.metrics.compute_metrics` and the Brier score on
the patients of each category of chosen fields (e.g. sex, location, age bands), with percentile
bootstrap 95% CIs over the subgroup's patients, and a flag where the subgroup is too small to say
anything.

A subgroup is flagged `too_small` when it has fewer than `min_n` patients or fewer than
`min_per_class` patients of some class (an AUC, a recall or a PPV of a class with 3 patients moves
by a third per patient); its figures are still computed and shown, with the reason. A missing value
is its own category ("missing").

Numeric fields enter as bands: `band_labels(values, edges)` cuts at the edges, e.g. edges (50, 65)
give "<50", "50-65", ">=65" (each band closed below, open above).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cfcml.evaluation.calibration import brier_per_sample
from cfcml.evaluation.metrics import _validate, bootstrap_ci, percentile_ci, resample_weights

MISSING = "missing"


def band_labels(values, edges: Sequence[float]) -> list[str]:
    """Band of each numeric value: "<e0", "e0-e1", ..., ">=e_last"; NaN/None -> "missing".

    Args:
        values: numbers [N] (NaN or None for missing).
        edges: strictly increasing cut points, at least one.
    Raises ValueError for empty or non-increasing edges.
    """
    e = [float(x) for x in edges]
    if not e or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"edges must be strictly increasing and non-empty; got {list(edges)}")

    names = band_names(e)
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(MISSING)
            continue
        out.append(names[int(np.searchsorted(e, float(v), side="right"))])
    return out


def band_names(edges: Sequence[float]) -> list[str]:
    """The band names of `edges`, low to high: "<e0", "e0-e1", ..., ">=e_last"."""
    e = [float(x) for x in edges]

    def fmt(x: float) -> str:
        return f"{x:g}"

    return [f"<{fmt(e[0])}"] + [f"{fmt(a)}-{fmt(b)}" for a, b in zip(e, e[1:])] + [f">={fmt(e[-1])}"]


def category_labels(values) -> list[str]:
    """Each value as a category name; None, NaN and blanks -> "missing"."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            out.append(MISSING)
        else:
            out.append(str(v))
    return out


@dataclass(frozen=True)
class SubgroupResult:
    """One category of one field: `n` patients (`class_counts` per class), each metric as (point,
    low, high); `too_small` with its `reason` when the figures say little."""

    field: str
    category: str
    n: int
    class_counts: tuple[int, ...]
    metrics: dict[str, tuple[float, float, float]]
    too_small: bool
    reason: str


def subgroup_metrics(task: str, y_true, probs, groups: Mapping[str, Sequence[str]], min_n: int = 20,
                     min_per_class: int = 5, n_boot: int = 1000, seed: int = 0,
                     order: Mapping[str, Sequence[str]] | None = None) -> list[SubgroupResult]:
    """Metrics per category of each field in `groups` (field name -> category label per patient, e.g.
    from `category_labels` or `band_labels`), categories in `order[field]` (those present), others
    sorted after them, "missing" last.

    Args:
        task: "multiclass" or "binary".
        y_true: int class indices [N]; probs: [N, C].
        groups: field -> N category labels.
        min_n: fewest patients for a subgroup to count as not too small, >= 1.
        min_per_class: fewest patients of every class, >= 0.
    Raises ValueError when a field's labels are not N long or for bad limits.
    """
    if min_n < 1 or min_per_class < 0:
        raise ValueError(f"need min_n >= 1 and min_per_class >= 0; got {min_n}, {min_per_class}")
    y, p = _validate(task, y_true, probs)
    C = p.shape[1]
    brier = brier_per_sample(y, p)
    out = []
    for name, raw_labels in groups.items():
        labels = np.asarray([str(v) for v in raw_labels], dtype=object)
        if len(labels) != len(y):
            raise ValueError(f"subgroup field {name!r}: {len(labels)} labels for {len(y)} patients")
        present = set(labels.tolist())
        known = [c for c in (order or {}).get(name, ()) if c in present and c != MISSING]
        cats = known + sorted(present - set(known) - {MISSING}) + ([MISSING] if MISSING in present else [])
        for cat in cats:
            rows = np.flatnonzero(labels == cat)
            yy, pp = y[rows], p[rows]
            counts = tuple(int((yy == k).sum()) for k in range(C))
            metrics = bootstrap_ci(task, yy, pp, n_boot=n_boot, seed=seed)
            w = resample_weights(len(rows), n_boot, seed)
            metrics["brier"] = percentile_ci(float(brier[rows].mean()), (w @ brier[rows]) / w.sum(1))
            reasons = []
            if len(rows) < min_n:
                reasons.append(f"{len(rows)} patients < {min_n}")
            if min(counts) < min_per_class:
                reasons.append(f"a class with {min(counts)} patients < {min_per_class}")
            out.append(SubgroupResult(name, cat, len(rows), counts, metrics, bool(reasons), "; ".join(reasons)))
    return out
