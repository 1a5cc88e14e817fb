"""`Estimate` and `format_estimate`: the one way every confidence interval is printed (model card,
clinical tables, comparison, search report, the model version's tags, the console)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cfcml.evaluation.metrics import MISSING, Estimate, bootstrap_ci, format_estimate, format_number

NAN = math.nan


@pytest.mark.parametrize("digits,expected", [(3, "0.812 [0.744, 0.871]"), (4, "0.8123 [0.7440, 0.8710]"),
                                             (2, "0.81 [0.74, 0.87]"), (0, "1 [1, 1]")])
def test_an_estimate_prints_as_point_and_interval_to_the_given_digits(digits: int, expected: str) -> None:
    assert format_estimate(Estimate(0.81234, 0.744, 0.871), digits) == expected


def test_three_decimals_is_the_default() -> None:
    assert format_estimate(Estimate(0.5, 0.25, 0.75)) == "0.500 [0.250, 0.750]"


@pytest.mark.parametrize("low,high", [(NAN, NAN), (NAN, 0.9), (0.7, NAN)])
def test_an_interval_with_a_nan_bound_prints_as_the_point_alone(low: float, high: float) -> None:
    assert format_estimate(Estimate(0.8, low, high)) == "0.800"
    assert format_estimate(Estimate(0.8)) == "0.800"  # bounds default to NaN: a figure without an interval


def test_an_undefined_point_prints_as_missing_whatever_its_bounds() -> None:
    assert format_estimate(Estimate(NAN, 0.1, 0.2)) == MISSING == "—"
    assert format_estimate(Estimate(NAN)) == MISSING


def test_a_signed_estimate_shows_every_sign() -> None:
    assert format_estimate(Estimate(0.012, -0.02, 0.041), signed=True) == "+0.012 [-0.020, +0.041]"
    assert f"{Estimate(0.012, -0.02, 0.041):+.3f}" == "+0.012 [-0.020, +0.041]"


def test_the_interval_alone_for_a_table_with_a_point_column() -> None:
    assert format_estimate(Estimate(0.6, 0.5, 0.7), 4, interval_only=True) == "[0.5000, 0.7000]"
    assert format_estimate(Estimate(0.6), 4, interval_only=True) == MISSING


@pytest.mark.parametrize("spec,expected", [("", "0.500 [0.250, 0.750]"), (".4f", "0.5000 [0.2500, 0.7500]"),
                                           (".1", "0.5 [0.2, 0.8]"), ("+.2f", "+0.50 [+0.25, +0.75]")])
def test_format_specs_go_through_the_same_formatter(spec: str, expected: str) -> None:
    estimate = Estimate(0.5, 0.25, 0.75)
    assert format(estimate, spec) == expected
    digits = int(spec.lstrip("+.").rstrip("f")) if spec else 3
    assert format(estimate, spec) == format_estimate(estimate, digits, signed=spec.startswith("+"))


@pytest.mark.parametrize("spec", [".3g", "10.3f", "x", ".3e"])
def test_a_spec_other_than_fixed_point_is_refused_naming_it(spec: str) -> None:
    with pytest.raises(ValueError, match=rf"Estimate format '{spec}': expected a fixed-point spec"):
        format(Estimate(0.5, 0.25, 0.75), spec)


def test_a_point_low_high_tuple_reads_as_an_estimate_and_prints_the_same() -> None:
    assert Estimate.of((0.8, 0.7, 0.9)) == Estimate(0.8, 0.7, 0.9)
    estimate = Estimate(0.8)
    assert Estimate.of(estimate) is estimate
    expected = "0.8000 [0.7000, 0.9000]"
    assert format_estimate((0.8, 0.7, 0.9), 4) == format_estimate(Estimate(0.8, 0.7, 0.9), 4) == expected
    with pytest.raises(ValueError, match=r"an estimate is \(point, low, high\); got 2 number\(s\)"):
        Estimate.of((0.8, 0.7))


def test_bootstrap_cis_read_as_estimates_with_their_interval_around_the_point() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    probs = np.clip(np.stack([1 - y * 0.6 - 0.2, y * 0.6 + 0.2], 1) + rng.normal(0, 0.15, (60, 2)), 0.01, 0.99)
    probs /= probs.sum(1, keepdims=True)
    auc = Estimate.of(bootstrap_ci("binary", y, probs, n_boot=100)["auc"])
    assert auc.has_interval and auc.low <= auc.point <= auc.high and auc.width == auc.high - auc.low


def test_an_estimate_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Estimate(0.5).point = 0.6  # type: ignore[misc]


@pytest.mark.parametrize("value,digits,expected", [(0.5, 3, "0.500"), (None, 3, MISSING), (NAN, 2, MISSING),
                                                   (np.float64(0.25), 2, "0.25"), (1, 1, "1.0")])
def test_a_figure_on_its_own_prints_fixed_point_or_missing(value, digits: int, expected: str) -> None:
    assert format_number(value, digits) == expected
