"""The placement-group janitor (`tuning.runtime.placement_groups`) on a real local Ray: it frees only the
groups whose creator actor the GCS records as dead, so a live Ray Train run keeps its workers'
CPUs however long its workers take to start (the hang of 2026-12-07: on a loaded machine the old
janitor removed a live run's placement group and the run waited forever)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent


def _one_report(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def test_a_train_run_slow_to_start_its_workers_keeps_its_placement_group_and_finishes(ray_local, tmp_path) -> None:
    """Its controller waits 8 s between its placement group being ready and submitting its worker
    (`slow_worker_group`, what a loaded machine does); the janitor checks every 0.3 s meanwhile."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from tuning.runtime.placement_groups import PlacementGroupJanitor
    from tuning.runtime.ray_cluster import LOCAL_RAY_ENV

    env = {**LOCAL_RAY_ENV, "PYTHONPATH": os.pathsep.join([str(HERE), LOCAL_RAY_ENV["PYTHONPATH"]]),
           "CFCML_TEST_PG_READY_DELAY_S": "8"}

    @ray.remote(num_cpus=0, runtime_env={"env_vars": env,
                                         "worker_process_setup_hook": "slow_worker_group.slow_placement_group_ready"})
    def trial(storage: str) -> str | None:  # stands for a Tune trial: its Ray Train run inherits the hook
        trainer = DataParallelTrainer(_one_report, scaling_config=ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": 0.01}), run_config=RunConfig(name="slow", storage_path=storage))
        error = trainer.fit().error
        return None if error is None else repr(error)

    janitor = PlacementGroupJanitor(period_s=0.3)
    ref = trial.remote(str(tmp_path))
    deadline = time.monotonic() + 150
    try:
        while not ray.wait([ref], timeout=0.3)[0] and time.monotonic() < deadline:
            janitor.on_step_begin(0, [])
        assert janitor.removed == [], "the janitor removed a live run's placement group"
        assert ray.wait([ref], timeout=0)[0], "the run did not finish in 150 s"
        assert ray.get(ref) is None  # the run finished without an error
    finally:
        # Only a task still running (a hung run) is cancelled: its controller dies with it. Cancelling
        # a task that has just finished races Ray's completion of it and aborts this driver process
        # ("Check failed: ... Tried to complete task that was not pending"; ray-project/ray#54798 fixed
        # a sibling of that race): the silent exit 1 of the e2e tests in CI on 2026-12-07.
        if not ray.wait([ref], timeout=0)[0]:
            ray.cancel(ref, force=True)
            time.sleep(1)
        janitor.sweep()


def test_the_janitor_frees_a_dead_creators_placement_group_and_keeps_live_and_driver_ones(ray_local) -> None:
    """A placement group created by an actor (as a Ray Train controller creates its workers') is
    kept, unused, while that actor lives and removed once it is dead; groups the driver created
    (Tune's trials', a user's) are never removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

    from tuning.runtime.placement_groups import PlacementGroupJanitor

    @ray.remote(num_cpus=0)
    class Controller:  # stands for Ray Train's controller
        def create(self) -> bytes:
            pg = placement_group([{"CPU": 0.01}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.binary()

    def state(pg_id: bytes) -> str:
        return placement_group_table(PlacementGroup(ray.PlacementGroupID(pg_id)))["state"]

    controllers = [Controller.remote() for _ in range(2)]
    groups = [ray.get(c.create.remote()) for c in controllers]
    driver_groups = [placement_group([{"CPU": 0.01}]), placement_group([{"memory": 1}])]  # a user's, Tune's
    ray.get([g.ready() for g in driver_groups], timeout=60)
    janitor = PlacementGroupJanitor(period_s=0.1)
    try:
        for _ in range(3):  # however often it looks, nothing live goes
            assert janitor.sweep() == set()
        ray.kill(controllers[0])
        deadline = time.monotonic() + 30
        while state(groups[0]) != "REMOVED" and time.monotonic() < deadline:
            janitor.sweep()
            time.sleep(0.2)
        assert [state(g) for g in groups] == ["REMOVED", "CREATED"]
        assert janitor.removed == [groups[0].hex()]
        assert [placement_group_table(g)["state"] for g in driver_groups] == ["CREATED", "CREATED"]
    finally:
        for c in controllers:
            ray.kill(c)
        for g in driver_groups:
            remove_placement_group(g)
        time.sleep(0.5)
        janitor.sweep()


def test_a_group_registered_after_its_creator_was_killed_with_its_owner_is_freed(ray_local) -> None:
    """The race of 2026-12-07 (`make demo`, a quiet machine): a Ray Train controller, killed because
    its trial actor (its owner) was stopped, registered a new worker group's placement group after
    the GCS had handled its death. That group's own record never says its creator died; the actor
    table does. Here an actor owned by another registers groups in a loop until it is killed with
    its owner: every group it leaves is freed, and none the driver made."""
    import threading

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from tuning.runtime.placement_groups import PlacementGroupJanitor, job_placement_groups, orphans

    @ray.remote(num_cpus=0)
    class Controller:  # registers tiny placement groups as fast as it can until its process dies
        def start(self) -> None:
            def loop() -> None:
                while True:
                    placement_group([{"CPU": 0.001}])
                    time.sleep(0.002)

            threading.Thread(target=loop, daemon=True).start()

    @ray.remote(num_cpus=0)
    class Trial:  # owns its controller, as a Tune trial actor owns its Ray Train controller
        def controller(self) -> list:
            self.c = Controller.remote()
            ray.get(self.c.start.remote())
            return [self.c]

    mine = placement_group([{"memory": 1}])  # the driver's (Tune's trial groups): never freed
    ray.get(mine.ready(), timeout=60)
    janitor = PlacementGroupJanitor(period_s=0.1)
    late = []
    try:
        for _ in range(5):  # each round: one owner killed while its controller registers groups
            trial = Trial.remote()
            ray.get(trial.controller.remote(), timeout=60)
            time.sleep(0.3)
            ray.kill(trial)
            time.sleep(2)  # the GCS has handled both deaths
            groups = [g for g in job_placement_groups() if g.creator_actor_id]
            late += [g for g in groups if not g.creator_actor_dead]
            janitor.sweep()
        left = [g for g in job_placement_groups() if g.creator_actor_id]
        assert left == [], f"{len(left)} group(s) of dead controllers left"
        # the case itself: groups whose own record never learnt that their creator died (on the
        # flag alone, as the janitor read it before, these stayed: one in each of 5 rounds)
        assert late and orphans(late, set()) == set()
        assert any(g.placement_group_id == mine.id.hex() and g.state == "CREATED" for g in job_placement_groups())
    finally:
        remove_placement_group(mine)
        time.sleep(0.5)
        janitor.sweep()
