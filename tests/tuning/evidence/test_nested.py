"""The nested estimate: the mean over outer folds of each fold's held-out figure, a bootstrap CI
around it resampled within the folds, the per-fold figures and chosen values, and the names it is
logged under."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cfcml.evaluation import metric_keys
from cfcml.evaluation.metrics import compute_metrics
from tuning.evidence.nested import OuterFold, nested_estimate, nested_line, nested_table
from tuning.records.outcome import SearchOutcome, TrialResult

CLASSES = ("a", "b", "c")


def _fold(k: int, n: int, noise: float, seed: int) -> tuple[OuterFold, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    logits = np.eye(len(CLASSES))[y] * 2.0 + rng.normal(0.0, noise, (n, len(CLASSES)))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(p, columns=[f"prob_{c}" for c in CLASSES])
    frame.insert(0, "label", y)
    frame.insert(0, "patient_id", [f"p{k}_{i}" for i in range(n)])
    metrics = compute_metrics("multiclass", y, p)
    return OuterFold(k, f"s-outer{k}", 2 * n, n, f"t{k}", 3, {"loss.w_sam": 0.1 * (k + 1)}, 0.9, metrics), frame


@pytest.fixture
def folds():
    return [_fold(0, 30, 1.0, 0), _fold(1, 27, 2.5, 1)]


def test_the_estimate_is_the_mean_over_outer_folds_with_a_ci_around_it(folds) -> None:
    nested = nested_estimate("multiclass", CLASSES, "cv_macro_auc", [f for f, _ in folds], [p for _, p in folds],
                             n_boot=200)
    assert list(nested.estimates)[:2] == ["macro_auc", "balanced_accuracy"]  # the headline metrics first
    for name in ("macro_auc", "balanced_accuracy"):
        e = nested.estimates[name]
        assert e.point == pytest.approx(np.mean([f.metrics[name] for f, _ in folds]))
        assert e.low <= e.point <= e.high and e.low < e.high


def test_the_ci_is_seeded_and_narrows_with_more_patients(folds) -> None:
    args = ("multiclass", CLASSES, "cv_macro_auc", [f for f, _ in folds], [p for _, p in folds])
    a, b = nested_estimate(*args, n_boot=100, seed=3), nested_estimate(*args, n_boot=100, seed=3)
    assert a.estimates == b.estimates
    big = [_fold(0, 300, 1.0, 0), _fold(1, 270, 2.5, 1)]
    wide = a.estimates["balanced_accuracy"].width
    narrow = nested_estimate("multiclass", CLASSES, "cv_macro_auc", [f for f, _ in big], [p for _, p in big],
                             n_boot=100, seed=3).estimates["balanced_accuracy"].width
    assert narrow < wide


def test_mismatched_folds_and_predictions_are_refused(folds) -> None:
    with pytest.raises(ValueError, match="1 prediction set"):
        nested_estimate("multiclass", CLASSES, "cv_macro_auc", [f for f, _ in folds], [folds[0][1]])


def test_the_metrics_are_named_by_metric_keys_with_bounds_and_folds(folds) -> None:
    nested = nested_estimate("multiclass", CLASSES, "cv_macro_auc", [f for f, _ in folds], [p for _, p in folds],
                             n_boot=50)
    values = nested.metrics()
    key = metric_keys.nested("macro_auc")
    assert {key, metric_keys.ci_low(key), metric_keys.ci_high(key), metric_keys.fold(key, 0),
            metric_keys.fold(key, 1)} <= set(values)
    assert values[metric_keys.fold(key, 1)] == folds[1][0].metrics["macro_auc"]
    assert metric_keys.parse(metric_keys.fold(key, 1)) == metric_keys.MetricKey(metric_keys.NESTED, "macro_auc", 1)
    record = nested.to_dict()
    assert [OuterFold.from_dict(f) for f in record["folds"]] == [f for f, _ in folds]


def test_the_table_sets_the_nested_figures_beside_the_ordinary_selected_and_last_epoch_ones(folds) -> None:
    nested = nested_estimate("multiclass", CLASSES, "cv_macro_auc", [f for f, _ in folds], [p for _, p in folds],
                             n_boot=50)
    best = TrialResult("best", {"loss.w_sam": 0.2}, score=0.97, epoch=2, epochs_run=3,
                       metrics={"cv_macro_auc": 0.97}, last_epoch_metrics={"cv_macro_auc": 0.91})
    outcome = SearchOutcome("men", "cv_macro_auc", [best], "/s", "/p", "sqlite://", "0", "r", ["loss.w_sam"])
    text = "\n".join(nested_table(nested, outcome))
    assert "ordinary search, selected" in text and "ordinary search, last epoch" in text
    assert "| macro_auc | " in text and "0.9700 | 0.9100 |" in text
    assert "| 1 | 54 / 27 | t1 | 3 |" in text and "loss.w_sam" in text  # each outer fold's choice
    line = nested_line(nested, outcome)
    assert "2 outer folds" in line and "0.970" in line and not math.isnan(nested.estimates["macro_auc"].point)
