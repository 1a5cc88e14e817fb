"""Every metric key is built and parsed by one module (cfcml/evaluation/metric_keys.py): the names
it builds are the ones MLflow, Tune, Optuna and outcome.json have always held, and parsing a key
gives back what built it."""
from __future__ import annotations

import pytest

from cfcml.evaluation import metric_keys as keys
from cfcml.evaluation.metric_keys import MetricKey


@pytest.mark.parametrize("built, key", [
    (keys.train("loss"), "train_loss"),
    (keys.TRAIN_LOSS, "train_loss"),
    (keys.fold(keys.train("loss"), 2), "train_loss_fold2"),
    (keys.fold(keys.val("macro_auc"), 0), "val_macro_auc_fold0"),
    (keys.cv("balanced_accuracy"), "cv_balanced_accuracy"),
    (keys.selected(keys.cv("macro_auc")), "selected_cv_macro_auc"),
    (keys.selected(keys.fold(keys.val("auc"), 1)), "selected_val_auc_fold1"),
    (keys.SELECTED_EPOCH, "selected_epoch"),
    (keys.last_epoch(keys.cv("auc")), "last_epoch_cv_auc"),
    (keys.test("auc"), "test_auc"),
    (keys.ci_low(keys.test("auc")), "test_auc_ci_low"),
    (keys.ci_high(keys.test("acc_class_1")), "test_acc_class_1_ci_high"),
    (keys.variant("no_mg", keys.diff("macro_auc")), "no_mg.diff_macro_auc"),
    (keys.system("cpu_utilization_percentage"), "system/cpu_utilization_percentage"),
])
def test_keys_are_spelt_as_the_stores_hold_them(built: str, key: str) -> None:
    assert built == key


@pytest.mark.parametrize("key, parsed", [
    ("val_macro_auc_fold2", MetricKey("val", "macro_auc", 2)),
    ("train_loss_fold0", MetricKey("train", "loss", 0)),
    ("train_loss", MetricKey("train", "loss")),
    ("cv_acc_class_0", MetricKey("cv", "acc_class_0")),
    ("selected_cv_auc", MetricKey("selected", "cv_auc")),
    ("selected_epoch", MetricKey("selected", "epoch")),
    ("last_epoch_cv_macro_auc", MetricKey("last_epoch", "cv_macro_auc")),
    ("test_auc_ci_low", MetricKey("test", "auc", bound="low")),
    ("test_balanced_accuracy_ci_high", MetricKey("test", "balanced_accuracy", bound="high")),
    ("test_op_men_sens90_sensitivity", MetricKey("test", "op_men_sens90_sensitivity")),
    ("system/gpu_0_memory_usage_megabytes", MetricKey("system", "gpu_0_memory_usage_megabytes")),
    ("epoch", MetricKey("other", "epoch")),
    ("cv_", MetricKey("other", "cv_")),  # a prefix alone names nothing
    ("cfcml.cv_auc", MetricKey("other", "cfcml.cv_auc")),
])
def test_a_parsed_key_builds_back_to_itself(key: str, parsed: MetricKey) -> None:
    assert keys.parse(key) == parsed
    assert str(parsed) == key


def test_per_fold_groups_a_kinds_fold_keys_by_metric() -> None:
    metrics = {"val_auc_fold1": 0.9, "val_auc_fold0": 0.8, "val_loss_fold0": 0.5, "cv_auc": 0.85,
               "train_loss_fold0": 1.0, "selected_val_auc_fold0": 0.7}
    assert keys.per_fold(metrics) == {"auc": {1: 0.9, 0: 0.8}, "loss": {0: 0.5}}
    assert keys.per_fold(metrics, keys.TRAIN) == {"loss": {0: 1.0}}


def test_kinds_are_told_by_prefix() -> None:
    assert keys.is_cv("cv_auc") and not keys.is_cv("selected_cv_auc") and not keys.is_cv("val_auc_fold0")
    assert keys.is_kind("selected_epoch", keys.SELECTED)
    assert keys.prefixes(keys.CV, keys.VAL, keys.TRAIN) == ("cv_", "val_", "train_")
    with pytest.raises(ValueError, match="'fold'"):
        keys.prefixes("fold")


@pytest.mark.parametrize("task, classes, expected", [
    ("multiclass", 3, ["macro_auc", "balanced_accuracy", "acc_class_0", "acc_class_1", "acc_class_2"]),
    ("binary", 2, ["auc", "balanced_accuracy", "specificity", "sensitivity"]),
])
def test_every_report_shows_the_ranking_the_decisions_and_each_class(task: str, classes: int, expected) -> None:
    assert keys.headline_metrics(task, classes) == expected
    assert keys.auc_metric(task) == expected[0]


def test_the_selection_key_is_a_cv_key_of_a_metric_the_task_has() -> None:
    from cfcml.config import ConfigError
    from cfcml.evaluation.metrics import metric_names, selection_key

    assert selection_key("binary", 2, "auc") == keys.cv("auc")
    assert set(keys.headline_metrics("multiclass", 3)) <= set(metric_names("multiclass", 3))
    with pytest.raises(ConfigError):
        selection_key("binary", 2, "macro_auc")
