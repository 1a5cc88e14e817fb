"""The held-out test split shapes nothing a search computes: a trial run by the real trainer (Ray
Train, `tuning.hpo.trainer`) on a dataset whose test rows have other labels, clinical values and
images reports the same metrics, epoch for epoch, and checkpoints the same normalisers as on the
original. (tests/test_training_leakage.py checks the same of `CrossValidation` directly, and that
a fold's normaliser and class weights ignore its validation rows.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tuning.hpo.trainer import TrainJob, fit
from tuning.records.checkpoints import open_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EPOCHS = 2


def _trial(prepared, experiment, storage: Path) -> tuple[list[dict], list[dict]]:
    """Every reported epoch's metrics (numbers only) and the last checkpoint's normalisers."""
    result = fit(TrainJob(experiment, str(prepared.out_dir), EPOCHS), name="trial", storage_path=str(storage),
                 metric="cv_macro_auc")
    assert result.error is None
    reports = [{k: v for k, v in row.items() if k.startswith(("cv_", "val_", "train_", "selected_"))}
               for row in result.metrics_dataframe.to_dict("records")]
    with open_checkpoint(result.checkpoint.path) as ckpt:
        normalizers = [w.normalizer for w in ckpt.fold_weights()]
    return reports, normalizers


def test_changed_test_rows_change_no_trial_metric_or_normaliser(ray_local, men_prepared, tiny_experiment,
                                                                altered_copy, tmp_path: Path) -> None:
    other = altered_copy(men_prepared, tmp_path / "other", lambda m: m["split"] == "test")
    experiment = tiny_experiment.replace({"loss.class_weights": "balanced"})
    reports, normalizers = _trial(men_prepared, experiment, tmp_path / "a")
    reports_other, normalizers_other = _trial(other, experiment, tmp_path / "b")
    assert len(reports) == EPOCHS and [r.keys() for r in reports] == [r.keys() for r in reports_other]
    for epoch, (a, b) in enumerate(zip(reports, reports_other), 1):
        for key in a:
            assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), (epoch, key)
    assert normalizers == normalizers_other
    # the change is one a fit over the test rows would see
    assert men_prepared.fit_normalizer(men_prepared.manifest).state_dict() != \
        other.fit_normalizer(other.manifest).state_dict()
