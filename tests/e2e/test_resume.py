"""A trial interrupted after an epoch continues from its checkpoint: every fold's model,
optimiser, scheduler and prototype bank come back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuning.hpo.trainer import TrainJob, fit
from tuning.records.checkpoints import open_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _state(result) -> dict:
    with open_checkpoint(result.checkpoint.path) as ckpt:
        return ckpt.state()


def test_trial_resumes_from_its_last_checkpoint(ray_local, men_prepared, tiny_experiment, tmp_path: Path) -> None:
    experiment = tiny_experiment.replace({"loss.momentum": 0.5})
    first = fit(TrainJob(experiment, str(men_prepared.out_dir), 1), name="trial", storage_path=str(tmp_path),
                metric="cv_macro_auc")
    s1 = _state(first)
    assert s1["epoch"] == 1 and len(s1["folds"]) == 2

    # Same run name and storage: Ray Train restores its checkpoint, the loop continues at epoch 2.
    second = fit(TrainJob(experiment, str(men_prepared.out_dir), 2), name="trial", storage_path=str(tmp_path),
                 metric="cv_macro_auc")
    s2 = _state(second)
    assert s2["epoch"] == 2
    for f1, f2 in zip(s1["folds"], s2["folds"]):
        steps1 = next(iter(f1["optimizer"]["state"].values()))["step"]
        steps2 = next(iter(f2["optimizer"]["state"].values()))["step"]
        assert steps1 > 0 and steps2 == 2 * steps1  # Adam's moments carried over, not restarted
        assert f2["scheduler"]["last_epoch"] == 2
        assert bool(f1["criterion"]["bank.filled"].all())  # the prototype bank travelled too
    # and the models did move on from the restored weights
    key = next(iter(s1["folds"][0]["model"]))
    assert not torch.equal(s1["folds"][0]["model"][key], s2["folds"][0]["model"][key])
