"""Decision curves: net benefit by hand, treat-all at p_t = 0 equal to the prevalence."""
from __future__ import annotations

import numpy as np
import pytest

from cfcml.evaluation.decision_curves import decision_curves, net_benefit, plot_decision_curves, treat_all_net_benefit


@pytest.mark.parametrize("prevalence", [0.1, 0.35, 0.8])
def test_treat_all_at_threshold_zero_is_the_prevalence(prevalence):
    assert treat_all_net_benefit(prevalence, [0.0])[0] == pytest.approx(prevalence)


def test_model_at_threshold_zero_treats_everyone():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    for c in decision_curves(y, p, ["a", "b", "c"], thresholds=[0.0, 0.5]):
        assert c.model[0] == pytest.approx(c.prevalence) == pytest.approx(c.treat_all[0])


def test_net_benefit_by_hand():
    positive = np.array([1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    # p_t = 0.5: acted on 0.9 (TP) and 0.6 (FP): 1/5 - 1/5 * 1 = 0
    # p_t = 0.25: acted on 0.9, 0.4 (TP) and 0.6 (FP): 2/5 - 1/5 * 1/3
    np.testing.assert_allclose(net_benefit(positive, score, [0.5, 0.25]), [0.0, 2 / 5 - 1 / 15])


def test_a_perfect_model_gains_the_prevalence_at_every_threshold():
    positive = np.array([1, 0, 0, 1, 0], bool)
    np.testing.assert_allclose(net_benefit(positive, positive.astype(float), [0.1, 0.5, 0.9]), 0.4)


def test_binary_has_one_curve_of_the_positive_class():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    (curve,) = decision_curves(y, p, ["NEV", "MEL"])
    assert curve.class_name == "MEL" and curve.prevalence == 0.5
    assert len(plot_decision_curves([curve]).axes) == 1


@pytest.mark.parametrize("bad", [[1.0], [-0.1], []])
def test_thresholds_outside_0_1_are_refused(bad):
    with pytest.raises(ValueError, match="thresholds"):
        net_benefit([True], [0.5], bad)
