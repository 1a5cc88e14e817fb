"""Calibration maths on constructed inputs: Brier against scikit-learn, ECE near 0 when calibrated
and large when shifted, temperature scaling lowering the held-out NLL."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from cfcml.evaluation.calibration import (
    apply_temperature,
    brier_score,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    plot_reliability,
    reliability_curve,
)


def calibrated_binary(n, seed=0):
    rng = np.random.default_rng(seed)
    p1 = rng.uniform(0, 1, n)
    y = (rng.uniform(0, 1, n) < p1).astype(int)  # drawn from the probabilities themselves
    return y, np.stack([1 - p1, p1], 1)


def softmax(z):
    z = z - z.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def calibrated_multiclass(n, C=3, seed=0):
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(size=(n, C)) * 2)
    y = np.array([rng.choice(C, p=row) for row in p])
    return y, p


def test_binary_brier_is_sklearns():
    y, p = calibrated_binary(200)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p[:, 1]))


def test_multiclass_brier_is_the_sum_over_classes():
    y, p = calibrated_multiclass(50)
    assert brier_score(y, p) == pytest.approx(((p - np.eye(3)[y]) ** 2).sum(1).mean())


@pytest.mark.parametrize("make", [calibrated_binary, calibrated_multiclass])
def test_ece_is_near_zero_on_calibrated_probabilities(make):
    y, p = make(20000)
    assert expected_calibration_error(y, p, n_bins=10) < 0.02


@pytest.mark.parametrize("shift", [2.0, 4.0])
def test_ece_is_large_on_overconfident_probabilities(shift):
    y, p = calibrated_multiclass(20000)
    sharpened = apply_temperature(p, 1 / shift)  # same argmax, overconfident
    assert expected_calibration_error(y, sharpened) > 0.1
    assert expected_calibration_error(y, sharpened) > expected_calibration_error(y, p) + 0.08


def test_ece_of_a_constant_confidence_is_the_gap_to_the_accuracy():
    y = np.array([1, 1, 1, 0])  # accuracy of "1" = 0.75, confidence 0.9
    p = np.tile([0.1, 0.9], (4, 1))
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.15)


def test_reliability_points_match_sklearns_calibration_curve():
    y, p = calibrated_binary(500, seed=3)
    conf, acc, counts = reliability_curve(y, p, n_bins=5)
    correct = (p.argmax(1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, p.max(1), n_bins=5, strategy="uniform")
    np.testing.assert_allclose(acc, prob_true)
    np.testing.assert_allclose(conf, prob_pred)
    assert counts.sum() == 500


def test_summary_intervals_hold_the_point_estimates():
    y, p = calibrated_multiclass(300)
    s = calibration_summary(y, p, n_bins=10, n_boot=200)
    assert s.n == 300 and s.n_bins == 10
    for point, low, high in (s.brier, s.ece):
        assert low <= point <= high
    assert s.nll == pytest.approx(negative_log_likelihood(y, p))


def test_temperature_scaling_lowers_the_nll_and_keeps_the_argmax():
    y, p = calibrated_multiclass(3000, seed=1)
    overconfident = apply_temperature(p, 0.4)
    t = fit_temperature(y, overconfident)
    assert t.t == pytest.approx(2.5, rel=0.15)  # undoes the sharpening
    assert t.nll_after < t.nll_before - 0.1
    calibrated = t.apply(overconfident)
    assert negative_log_likelihood(y, calibrated) == pytest.approx(t.nll_after, rel=1e-6)
    assert (calibrated.argmax(1) == overconfident.argmax(1)).all()
    assert expected_calibration_error(y, calibrated) < expected_calibration_error(y, overconfident)


def test_temperature_of_calibrated_probabilities_is_about_one():
    y, p = calibrated_multiclass(5000, seed=2)
    assert fit_temperature(y, p).t == pytest.approx(1.0, abs=0.1)


def test_temperature_never_raises_the_nll():
    y = np.array([0, 1])
    p = np.array([[0.5, 0.5], [0.5, 0.5]])  # every temperature gives the same likelihood
    t = fit_temperature(y, p)
    assert t.nll_after <= t.nll_before + 1e-12


def test_temperature_one_is_the_identity_and_zeros_stay_finite():
    p = np.array([[1.0, 0.0], [0.3, 0.7]])
    out = apply_temperature(p, 1.0)
    np.testing.assert_allclose(out, p, atol=1e-11)
    assert np.isfinite(apply_temperature(p, 3.0)).all()


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan")])
def test_a_temperature_that_is_not_positive_is_refused(t):
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.array([[0.5, 0.5]]), t)


def test_reliability_plot_has_a_curve_per_set():
    y, p = calibrated_binary(100)
    fig = plot_reliability({"raw": (y, p), "calibrated": (y, apply_temperature(p, 2.0))}, n_bins=10)
    assert isinstance(fig, Figure)
    assert len(fig.axes[0].lines) == 3


def test_ece_is_large_on_probabilities_shifted_away_from_the_outcome_rates():
    rng = np.random.default_rng(5)
    p1 = rng.uniform(0.5, 0.7, 20000)
    y = (rng.uniform(0, 1, 20000) < p1).astype(int)  # calibrated at p1
    shifted = np.clip(p1 + 0.25, 0, 1)  # every confidence 0.25 too high
    ece = expected_calibration_error(y, np.stack([1 - shifted, shifted], 1), n_bins=10)
    assert ece == pytest.approx(0.25, abs=0.02)
