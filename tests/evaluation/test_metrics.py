"""Metrics: hand-checked values, undefined cases, bootstrap CIs, plots."""
from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from cfcml.evaluation.metrics import bootstrap_ci, compute_metrics, plot_confusion, plot_roc, weighted_metrics

MULTICLASS_KEYS = {"accuracy", "acc_class_0", "acc_class_1", "acc_class_2", "balanced_accuracy", "f1_weighted",
                   "f1_macro", "macro_auc"}
BINARY_KEYS = {"sensitivity", "specificity", "accuracy", "g_mean", "balanced_accuracy", "auprc", "auc"}


def one_hot_probs(pred, C, confidence=0.8):
    probs = np.full((len(pred), C), (1 - confidence) / (C - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def noisy_predictions(N, C, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    logits = rng.normal(size=(N, C)) + 1.5 * np.eye(C)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("task,C", [("multiclass", 3), ("binary", 2)])
def test_perfect_predictions_score_one(task, C):
    y = np.array([0, 1, 2, 0, 1, 2])[: 6 if C == 3 else 4] % C
    out = compute_metrics(task, y, one_hot_probs(y, C))
    assert set(out) == (MULTICLASS_KEYS if task == "multiclass" else BINARY_KEYS)
    assert all(v == pytest.approx(1.0) for v in out.values()), out


def test_multiclass_hand_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = one_hot_probs(pred, 3)
    probs[:, 0] += np.array([0.0, 0.05, 0.0, 0.02, 0.01, 0.0])  # break AUC ties, keep the argmax
    out = compute_metrics("multiclass", y, probs)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert [out[f"acc_class_{k}"] for k in range(3)] == pytest.approx([0.5, 1.0, 0.5])
    assert out["balanced_accuracy"] == pytest.approx(2 / 3)  # mean of the class recalls
    f1 = [2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 1 + 0), 2 * 1 / (2 * 1 + 0 + 1)]  # 2tp / (2tp + fp + fn)
    assert out["f1_macro"] == pytest.approx(np.mean(f1))
    assert out["f1_weighted"] == pytest.approx(np.mean(f1))  # equal supports
    # class 0 one-vs-rest: positives score 0.8, 0.15; negatives 0.1, 0.12, 0.11, 0.8: (3.5 + 3) / 8
    auc0 = 6.5 / 8
    assert roc_auc_score(y == 0, probs[:, 0]) == pytest.approx(auc0)
    want = np.mean([auc0, roc_auc_score(y == 1, probs[:, 1]), roc_auc_score(y == 2, probs[:, 2])])
    assert out["macro_auc"] == pytest.approx(want)
    y, probs = noisy_predictions(30, 3)  # rows sum to 1: sklearn's own multiclass AUC applies
    want = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert compute_metrics("multiclass", y, probs)["macro_auc"] == pytest.approx(want)


def test_binary_hand_values():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8])  # predictions 0, 1, 0, 1
    out = compute_metrics("binary", y, np.stack([1 - p1, p1], 1))
    assert out["sensitivity"] == pytest.approx(0.5)
    assert out["specificity"] == pytest.approx(0.5)
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["g_mean"] == pytest.approx(0.5)
    assert out["balanced_accuracy"] == pytest.approx(0.5)
    assert out["auc"] == pytest.approx(3 / 4)  # 3 of 4 (pos, neg) pairs ranked right
    assert out["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # recall steps at precision 1 and 2/3
    assert compute_metrics("binary", y, p1) == out  # [N] probabilities of the positive class


def test_binary_sensitivity_specificity_are_not_swapped():
    y = np.array([1, 1, 1, 0])
    out = compute_metrics("binary", y, one_hot_probs(np.array([1, 1, 0, 0]), 2))
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(1.0)
    assert out["g_mean"] == pytest.approx(math.sqrt(2 / 3))


@pytest.mark.parametrize("task,C", [("multiclass", 3), ("binary", 2)])
def test_single_class_does_not_crash(task, C):
    y = np.zeros(5, dtype=int)
    probs = one_hot_probs(np.array([0, 0, 1, 0, 1]), C)
    out = compute_metrics(task, y, probs)
    if task == "binary":
        assert math.isnan(out["auc"]) and math.isnan(out["auprc"]) and math.isnan(out["sensitivity"])
        assert out["specificity"] == pytest.approx(0.6)
    else:
        assert math.isnan(out["macro_auc"]) and math.isnan(out["acc_class_1"])
        assert out["acc_class_0"] == pytest.approx(0.6)
    ci = bootstrap_ci(task, y, probs, n_boot=50)
    assert set(ci) == set(out)


def test_macro_auc_over_classes_present():
    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 absent
    _, probs = noisy_predictions(6, 3, seed=1)
    out = compute_metrics("multiclass", y, probs)
    want = np.mean([roc_auc_score(y == 0, probs[:, 0]), roc_auc_score(y == 1, probs[:, 1])])
    assert out["macro_auc"] == pytest.approx(want)
    assert math.isnan(out["acc_class_2"])


@pytest.mark.parametrize("task,C", [("multiclass", 3), ("binary", 2)])
def test_vectorised_metrics_equal_sklearn_on_resamples(task, C):
    y, probs = noisy_predictions(40, C, seed=2)
    probs = np.round(probs, 1)  # ties in the scores
    rng = np.random.default_rng(0)
    idx = [np.arange(40)] + [rng.integers(0, 40, 40) for _ in range(5)] + [np.where(y == 0)[0]]
    weights = np.stack([np.bincount(i, minlength=40) for i in idx]).astype(float)
    vectorised = weighted_metrics(task, y, probs, weights)
    for r, i in enumerate(idx):
        want = compute_metrics(task, y[i], probs[i])
        for name, value in want.items():
            np.testing.assert_allclose(vectorised[name][r], value, rtol=1e-12, atol=1e-12, err_msg=f"{name} {r}")


@pytest.mark.parametrize("task,C", [("multiclass", 3), ("binary", 2)])
def test_bootstrap_contains_point_and_is_seeded(task, C):
    y, probs = noisy_predictions(120, C, seed=3)
    ci = bootstrap_ci(task, y, probs, n_boot=300, seed=1)
    point = compute_metrics(task, y, probs)
    assert set(ci) == set(point)
    for name, (value, low, high) in ci.items():
        assert value == point[name]
        assert low <= value <= high, (name, low, value, high)
        assert low < high, name
    assert bootstrap_ci(task, y, probs, n_boot=300, seed=1) == ci
    assert bootstrap_ci(task, y, probs, n_boot=300, seed=2) != ci


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="task"):
        compute_metrics("regression", [0, 1], np.eye(2))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        compute_metrics("binary", [0, 1], np.eye(3)[:2])
    with pytest.raises(ValueError, match="outside"):
        compute_metrics("multiclass", [0, 3], np.eye(3)[:2])
    with pytest.raises(ValueError, match="class_names"):
        plot_roc([0, 1], np.eye(2), ["a", "b", "c"])


@pytest.mark.parametrize("C", [2, 3])
def test_plots_return_figures(tmp_path, C):
    y, probs = noisy_predictions(30, C, seed=4)
    names = [f"class {k}" for k in range(C)]
    roc = plot_roc(y, probs, names)
    conf = plot_confusion(y, probs, names)
    for fig, name in ((roc, "roc.png"), (conf, "confusion.png")):
        assert isinstance(fig, Figure) and fig.axes
        fig.savefig(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0
    legend = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert len(legend) == (1 if C == 2 else C) and all("AUC" in t for t in legend)
    counts = sorted(int(t.get_text()) for t in conf.axes[0].texts)
    assert sum(counts) == 30 and len(counts) == C * C


@pytest.mark.parametrize("task,C", [("multiclass", 3), ("binary", 2)])
def test_metric_names_are_what_compute_metrics_returns(task, C):
    from cfcml.evaluation.metrics import metric_names

    y = np.arange(6) % C
    assert tuple(compute_metrics(task, y, one_hot_probs(y, C))) == metric_names(task, C)


def test_paired_bootstrap_difference_is_centred_on_the_difference_and_zero_for_equal_models():
    from cfcml.evaluation.metrics import paired_bootstrap_diff

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.clip(y + rng.normal(0, 0.6, 300), -2, 3)
    bad = np.clip(y + rng.normal(0, 1.5, 300), -2, 3)
    to_probs = lambda s: np.stack([1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))], 1)  # noqa: E731
    diff, low, high = paired_bootstrap_diff("binary", y, to_probs(good), to_probs(bad), "auc", n_boot=400)
    want = compute_metrics("binary", y, to_probs(good))["auc"] - compute_metrics("binary", y, to_probs(bad))["auc"]
    assert diff == pytest.approx(want) and 0 < low < diff < high
    same = paired_bootstrap_diff("binary", y, to_probs(good), to_probs(good), "auc", n_boot=50)
    assert same == (0.0, 0.0, 0.0)  # paired: identical models differ by exactly nothing in every resample
