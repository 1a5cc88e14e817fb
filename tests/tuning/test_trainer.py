"""The checkpoint policy of a Ray Train run (no Ray needed: the policy is plain arithmetic)."""
from __future__ import annotations

import pytest

from tuning.trainer import CheckpointPolicy


@pytest.mark.parametrize("every, max_epochs, selected, written", [
    (1, 4, {}, [1, 2, 3, 4]),                 # every epoch, as before the policy
    (5, 12, {}, [5, 10, 12]),                 # a final model: every 5th and the last
    (5, 12, {1: 1, 2: 2, 3: 2, 7: 7}, [1, 2, 5, 7, 10, 12]),  # plus each newly selected epoch
    (3, 2, {1: 1, 2: 1}, [1, 2]),             # the last epoch even below `every`
])
def test_a_run_checkpoints_every_nth_epoch_each_newly_selected_epoch_and_the_last(
        every: int, max_epochs: int, selected: dict[int, int], written: list[int]) -> None:
    policy = CheckpointPolicy(every, max_epochs)
    assert [e for e in range(1, max_epochs + 1) if policy.due(e, selected.get(e))] == written


def test_a_tied_epoch_that_becomes_the_selected_one_is_checkpointed() -> None:
    # EpochSelection picks the latest of tied epochs: its checkpoint must exist
    from tuning.outcome import EpochSelection

    selection, policy = EpochSelection("cv_auc"), CheckpointPolicy(10, 20)
    due = [e for e, auc in enumerate([0.7, 0.7, 0.6], start=1)
           if policy.due(e, selection.update({"epoch": e, "cv_auc": auc})["selected_epoch"])]
    assert due == [1, 2]


def test_the_checkpoint_interval_must_be_positive() -> None:
    from cfcml.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=0)
