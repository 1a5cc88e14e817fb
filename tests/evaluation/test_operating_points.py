"""Operating points: thresholds fitted on one set reach their target there, are evaluated with
CIs on another, and do not depend on the evaluation rows."""
from __future__ import annotations

import numpy as np
import pytest

from cfcml.evaluation.operating_points import evaluate_operating_point, fit_operating_points


def scores(n, C=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    z = rng.normal(size=(n, C)) + 1.2 * np.eye(C)[y]
    return y, np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_binary_points_are_fitted_on_the_positive_class_only():
    y, p = scores(300)
    points = fit_operating_points(y, p, ["NEV", "MEL"], target_sensitivity=0.9)
    assert [(q.class_name, q.name) for q in points] == [("MEL", "sensitivity_0.90"), ("MEL", "youden")]
    sens = points[0]
    assert sens.fit_sensitivity >= 0.9
    positive = y == 1
    assert (p[positive, 1] >= sens.threshold).mean() == pytest.approx(sens.fit_sensitivity)
    # the highest such threshold: the next higher score misses the target
    higher = np.sort(np.unique(p[:, 1]))
    above = higher[higher > sens.threshold]
    if len(above):
        assert (p[positive, 1] >= above[0]).mean() < 0.9


def test_youden_maximises_sensitivity_plus_specificity():
    y, p = scores(200, seed=4)
    youden = fit_operating_points(y, p, ["a", "b"])[1]
    positive = y == 1

    def j(t):
        return (p[positive, 1] >= t).mean() + (p[~positive, 1] < t).mean() - 1

    assert j(youden.threshold) == pytest.approx(max(j(t) for t in np.unique(p[:, 1])))
    assert youden.fit_sensitivity + youden.fit_specificity - 1 == pytest.approx(j(youden.threshold))


def test_multiclass_fits_every_class_one_vs_rest():
    y, p = scores(300, C=3)
    points = fit_operating_points(y, p, ["g1", "g2", "g3"], target_sensitivity=0.8)
    assert [(q.class_index, q.kind) for q in points] == [(k, kind) for k in range(3)
                                                         for kind in ("sensitivity", "youden")]
    assert all(q.fit_sensitivity >= 0.8 for q in points if q.kind == "sensitivity")


def test_rates_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p1 = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4, 0.6])
    p = np.stack([1 - p1, p1], 1)
    point = fit_operating_points(y, p, ["n", "p"], target_sensitivity=1.0)[0]
    assert point.threshold == pytest.approx(0.3)
    r = evaluate_operating_point(point, y, p, n_boot=200)
    # at >= 0.3: TP 4, FN 0, FP 2 (0.7, 0.4), TN 2
    assert r.rates["sensitivity"][0] == pytest.approx(1.0)
    assert r.rates["specificity"][0] == pytest.approx(0.5)
    assert r.rates["ppv"][0] == pytest.approx(4 / 6)
    assert r.rates["npv"][0] == pytest.approx(1.0)
    for point_value, low, high in r.rates.values():
        assert low <= point_value <= high


def test_thresholds_do_not_depend_on_the_evaluation_rows():
    y_fit, p_fit = scores(200, seed=1)
    before = fit_operating_points(y_fit, p_fit, ["a", "b", "c"][:2])
    for seed in (2, 3):
        y_test, p_test = scores(50 + 30 * seed, seed=seed)
        for q in before:
            evaluate_operating_point(q, y_test, p_test, n_boot=50)
        assert fit_operating_points(y_fit, p_fit, ["a", "b"]) == before


@pytest.mark.parametrize("target", [0.0, 1.5, -0.1])
def test_a_target_outside_0_1_is_refused(target):
    y, p = scores(20)
    with pytest.raises(ValueError, match="target_sensitivity"):
        fit_operating_points(y, p, ["a", "b"], target_sensitivity=target)


def test_a_class_without_positives_cannot_be_fitted():
    y = np.zeros(10, int)
    p = np.tile([0.6, 0.4], (10, 1))
    with pytest.raises(ValueError, match="positives and negatives"):
        fit_operating_points(y, p, ["a", "b"])


def test_unfittable_classes_can_be_left_out():
    y = np.array([0, 0, 1, 1, 0])
    p = np.random.default_rng(0).dirichlet(np.ones(3), 5)  # class 2 never occurs
    points = fit_operating_points(y, p, ["a", "b", "c"], skip_unfittable=True)
    assert {q.class_name for q in points} == {"a", "b"}
