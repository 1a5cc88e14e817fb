"""The trial watchdog (`tuning.runtime.watchdog`) on real Ray Tune and Ray Train: a trial whose Ray Train
run can never get its CPUs is named with what it waits for and failed; a trial whose workers are
alive but slow to report is named and waited for; the rest of the experiment finishes."""
from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _trainable(config: dict) -> None:
    import ray.train
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    if config["kind"] == "quick":
        for epoch in range(1, 4):
            time.sleep(0.2)
            tune.report({"epoch": epoch})
        return

    def loop(train_config: dict) -> None:
        time.sleep(train_config["epoch_s"])
        ray.train.report({"epoch": 1})

    slow = config["kind"] == "slow"  # its worker fits beside the others; its one epoch lasts 60 s
    DataParallelTrainer(loop, train_loop_config={"epoch_s": 60 if slow else 0},
                        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.01 if slow else 1}),
                        run_config=RunConfig(name=config["kind"], storage_path=config["storage"])).fit()


def test_a_trial_waiting_for_cpus_that_never_free_is_failed_and_one_training_slowly_is_waited_for(
        ray_local, tmp_path, capsys) -> None:
    import sys

    import ray
    from ray import cloudpickle, tune
    from ray.util.placement_group import placement_group, remove_placement_group

    from tuning.runtime.placement_groups import PlacementGroupJanitor, orphaned_placement_groups
    from tuning.runtime.watchdog import TrialWatchdog
    from tuning.tracking.callbacks import failure_reason

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import tests/
    reasons: dict[str, str] = {}

    class Reasons(tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            reasons[trial.config["kind"]] = failure_reason(trial)

    hog = placement_group([{"CPU": 1.5}])  # another program's: 0.5 of the 2 CPUs stay free
    ray.get(hog.ready(), timeout=60)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": 0, "memory": 1}),  # as tuning.hpo.tuner
            param_space={"kind": tune.grid_search(["quick", "stuck", "slow"]), "storage": str(tmp_path / "train")},
            run_config=tune.RunConfig(name="watchdog", storage_path=str(tmp_path), verbose=0, callbacks=[
                Reasons(), PlacementGroupJanitor(period_s=0.5), TrialWatchdog(stall_s=40, period_s=0.5)]),
        )
        started = time.monotonic()
        results = tuner.fit()
        took = time.monotonic() - started
    finally:
        remove_placement_group(hog)
    status = {r.config["kind"]: ("ERROR" if r.error else "TERMINATED") for r in results}
    assert status == {"quick": "TERMINATED", "stuck": "ERROR", "slow": "TERMINATED"}, reasons
    assert took < 240  # not forever: the stuck trial alone would hold the experiment until the test timeout
    line = reasons["stuck"]
    assert "stalled: nothing reported for" in line and "train.stall_timeout_s 40 s" in line
    assert "a placement group of [{'CPU': 1.0}]" in line, line
    out = capsys.readouterr().out
    assert f"[cfcml] {line}" in out
    noted = [x for x in out.splitlines() if x.endswith("alive and training (a busy machine?): waiting")]
    assert len(noted) == 1 and noted[0].startswith("[cfcml] trial ")  # the slow one, named once
    time.sleep(1)  # the killed trial's controller is dead: its placement group goes on the next sweep
    PlacementGroupJanitor().sweep()
    assert orphaned_placement_groups() == set()


def test_the_watchdog_refuses_a_limit_that_is_not_positive() -> None:
    from tuning.runtime.watchdog import TrialWatchdog

    for stall_s, period_s in ((0, 1), (-5, 1), (600, 0), (float("nan"), 1)):
        with pytest.raises(ValueError, match="must be positive"):
            TrialWatchdog(stall_s, period_s)
