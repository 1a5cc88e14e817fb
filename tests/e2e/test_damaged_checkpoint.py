"""A truncated checkpoint file (a node that died mid-write, a full disk): the restarted run names
the damaged file and continues from the checkpoint before it rather than failing or starting over."""
from __future__ import annotations

from pathlib import Path

import pytest

from tuning.hpo.trainer import TrainJob, fit
from tuning.records.checkpoints import STATE_FILE, CheckpointReader, open_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_a_truncated_latest_checkpoint_is_named_and_the_one_before_it_is_used(
        ray_local, men_prepared, tiny_experiment, tmp_path: Path) -> None:
    job = TrainJob(tiny_experiment, str(men_prepared.out_dir), 2)
    first = fit(job, name="trial", storage_path=str(tmp_path), metric="cv_macro_auc")
    latest = Path(first.checkpoint.path)
    older = sorted(p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p != latest)
    assert CheckpointReader(latest).epoch == 2 and [CheckpointReader(p).epoch for p in older] == [1]

    state = latest / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut in half, as a died write leaves it

    # The same run again (what a restarted worker group or a resumed search does): Ray Train hands
    # over its latest checkpoint; the loop refuses it, names the file and takes epoch 1's.
    second = fit(job, name="trial", storage_path=str(tmp_path), metric="cv_macro_auc")
    assert second.error is None
    metrics = second.metrics
    assert metrics["epoch"] == 2 and metrics["resumed_from_epoch"] == 1
    (message,) = metrics["checkpoints_skipped"]
    assert str(state) in message and "truncated" in message
    with open_checkpoint(second.checkpoint.path) as ckpt:
        assert ckpt.epoch == 2 and ckpt.state()["epoch"] == 2  # a whole, verified checkpoint again
    # the selection continues from epoch 1's checkpoint: the discarded epoch 2 never counts
    first_epoch = first.metrics_dataframe.set_index("epoch").loc[1]
    scores = {1: first_epoch["cv_macro_auc"], 2: metrics["cv_macro_auc"]}
    best = max(scores.values())
    assert metrics["selected_cv_macro_auc"] == best
    assert metrics["selected_epoch"] == max(e for e, s in scores.items() if s == best)
