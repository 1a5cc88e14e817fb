"""Subgroup metrics: per category, CIs, the small-subgroup flag, bands of a numeric field."""
from __future__ import annotations

import numpy as np
import pytest

from cfcml.evaluation.metrics import compute_metrics
from cfcml.evaluation.subgroups import band_labels, category_labels, subgroup_metrics


def test_bands_are_closed_below_and_missing_is_its_own():
    assert band_labels([10, 50, 64.9, 65, float("nan"), None], [50, 65]) == \
        ["<50", "50-65", "50-65", ">=65", "missing", "missing"]


@pytest.mark.parametrize("edges", [[], [60, 50], [50, 50]])
def test_bad_edges_are_refused(edges):
    with pytest.raises(ValueError, match="edges"):
        band_labels([1.0], edges)


def test_categories_name_missing_values():
    assert category_labels(["0", None, float("nan"), " ", "1"]) == ["0", "missing", "missing", "missing", "1"]


def test_each_subgroup_scores_its_own_patients_and_small_ones_are_flagged():
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.2, n), 0.01, 0.99)
    p = np.stack([1 - p1, p1], 1)
    sex = np.where(np.arange(n) < 100, "female", "male").astype(object)
    sex[:3] = "missing"
    rows = subgroup_metrics("binary", y, p, {"sex": list(sex)}, min_n=30, min_per_class=5, n_boot=100)
    assert [(r.field, r.category) for r in rows] == [("sex", "female"), ("sex", "male"), ("sex", "missing")]
    female = rows[0]
    mask = sex == "female"
    assert female.n == mask.sum()
    assert female.metrics["auc"][0] == pytest.approx(compute_metrics("binary", y[mask], p[mask])["auc"])
    assert female.metrics["brier"][1] <= female.metrics["brier"][0] <= female.metrics["brier"][2]
    assert not female.too_small
    assert rows[1].too_small and "20 patients < 30" in rows[1].reason
    assert rows[2].too_small


def test_a_field_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="sex"):
        subgroup_metrics("binary", [0, 1], [[0.5, 0.5], [0.2, 0.8]], {"sex": ["a"]})


def test_categories_follow_the_given_order_then_the_rest_sorted_then_missing():
    y = np.array([0, 1] * 4)
    p = np.tile([0.4, 0.6], (8, 1))
    bands = band_labels([70, 30, 55, None, 70, 30, 55, 40], [50, 65])
    rows = subgroup_metrics("binary", y, p, {"age": bands}, n_boot=10, order={"age": ["<50", "50-65", ">=65"]})
    assert [r.category for r in rows] == ["<50", "50-65", ">=65", "missing"]
