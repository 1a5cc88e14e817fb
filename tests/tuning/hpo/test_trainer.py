"""The checkpoint policy of a Ray Train run and the state its background writes take (no Ray needed)."""
from __future__ import annotations

import pytest

from tuning.hpo.trainer import CheckpointPolicy


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
    from tuning.records.outcome import EpochSelection

    selection, policy = EpochSelection("cv_auc"), CheckpointPolicy(10, 20)
    due = [e for e, auc in enumerate([0.7, 0.7, 0.6], start=1)
           if policy.due(e, selection.update({"epoch": e, "cv_auc": auc})["selected_epoch"])]
    assert due == [1, 2]


def test_the_checkpoint_interval_must_be_positive() -> None:
    from cfcml.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=0)


def test_a_checkpoint_written_in_the_background_holds_the_state_of_its_epoch_not_a_later_one() -> None:
    # report_epoch writes a due checkpoint on Ray Train's upload thread while the next epoch
    # trains: what it writes is `_detached` at report time, and an optimiser step after that
    # (in-place updates of weights and Adam moments) must not reach it.
    import torch

    from tuning.hpo.trainer import _detached

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {"epoch": 1, "folds": [{"model": net.state_dict(), "optimizer": opt.state_dict()}]}
    copy = _detached(state)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moment = opt.state_dict()["state"][0]["exp_avg"].clone()
    net(torch.ones(4, 3)).sum().backward()
    opt.step()  # the next epoch
    assert not torch.equal(net.weight, before["weight"])  # training did change the live state
    for key, value in before.items():
        assert torch.equal(copy["folds"][0]["model"][key], value)
    assert torch.equal(copy["folds"][0]["optimizer"]["state"][0]["exp_avg"], moment)
    assert copy["epoch"] == 1


@pytest.mark.parametrize(("name", "expected"), [
    ("trial_1a2b3c4d", "trial_1a2b3c4d"),
    ("final_it's mine_1a2b", "final_it's mine_1a2b"),  # ASCII stays as it is (a rerun finds its run)
    ("final_süche_1a2b", "final_suche_1a2b-"),
    ("compare_Ñúñez_x", "compare_Nunez_x-"),
    ("final_患者_x", "final____x-"),
])
def test_a_ray_train_run_name_is_ascii_and_names_beyond_ascii_stay_distinct(name: str, expected: str) -> None:
    from tuning.hpo.trainer import ray_train_name

    out = ray_train_name(name)
    assert out.isascii() and out.startswith(expected) and ray_train_name(out) == out
    if not name.isascii():  # 8 hex digits of the name's hash: not the run of the ASCII name it resembles
        assert len(out) == len(expected) + 8 and ray_train_name(expected[:-1]) != out


def test_the_worker_loops_config_is_one_typed_object_that_pickles_for_ray() -> None:
    import pickle

    from ray import cloudpickle

    from cfcml.config import load_experiment
    from tuning.hpo.trainer import LOOP_CONFIG, LoopConfig, TrainJob

    loop = LoopConfig(TrainJob(load_experiment("men"), "/data/prepared", 3, final=True, predict_test=True),
                      failure_file="/runs/train/final_x/cfcml_diverged.json", run_dir="/runs/train/final_x")
    for dumps in (pickle.dumps, cloudpickle.dumps):  # Ray Train ships train_loop_config with cloudpickle
        config = pickle.loads(dumps({LOOP_CONFIG: loop}))
        assert config[LOOP_CONFIG] == loop and config[LOOP_CONFIG].job.experiment == loop.job.experiment
    assert LoopConfig(loop.job).failure_file is None and LoopConfig(loop.job).run_dir is None  # remote storage
