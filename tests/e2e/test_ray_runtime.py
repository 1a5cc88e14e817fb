"""A local Ray started by the project (`tuning.runtime.ray_cluster`) with another Ray running on the same
machine: Ray Train's placement-group cleaner still frees a dead controller's placement group.

Found as a hang: a search run as a subprocess beside the tests' own Ray; Tune stopped a finished
trial (ASHA at its last epoch), its Ray Train controller died before shutting its worker group
down, the cleaner's state-API query raised "Found multiple active Ray instances" and stopped, and
the next trial's workers waited 300 s for the 2 CPUs the dead placement group still held.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest


@pytest.fixture
def another_ray():
    """A second Ray instance on this machine, as another user's or another search's would be."""
    from ray._private import services

    def instances() -> int:
        services._thread_safe_find_gcs_addresses_cache_clear()  # Ray caches what it found
        return len(services.find_gcs_addresses())

    before = instances()
    code = ("import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False);"
            " print('up', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        deadline = time.time() + 30
        while instances() <= before and time.time() < deadline:
            time.sleep(0.2)
        assert instances() > before
        yield
    finally:
        proc.terminate()  # ray.init's own atexit shuts its processes down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_dead_controllers_placement_group_is_freed_while_another_ray_runs(ray_local, another_ray) -> None:
    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner
    from ray.util.placement_group import placement_group, placement_group_table

    @ray.remote(num_cpus=0)
    class Controller:  # stands for Ray Train's controller: it owns nothing, it only dies
        def ready(self) -> bool:
            return True

    controller = Controller.remote()
    ray.get(controller.ready.remote())
    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    # as Ray Train's PlacementGroupCleanerCallback starts it
    cleaner = ray.remote(num_cpus=0)(PlacementGroupCleaner).options(lifetime="detached").remote(
        controller_actor_id=controller._actor_id.hex(), check_interval_s=0.2, get_actor_timeout_s=10,
        stop_timeout=2.0)
    ray.get(cleaner.register_placement_group.remote(pg))
    ray.get(cleaner.start_monitoring.remote())
    ray.kill(controller)  # as Tune stopping a trial kills its controller
    deadline = time.time() + 30
    while placement_group_table(pg).get("state") != "REMOVED" and time.time() < deadline:
        time.sleep(0.2)
    state = placement_group_table(pg).get("state")
    if state != "REMOVED":
        ray.util.remove_placement_group(pg)
        ray.kill(cleaner)
    assert state == "REMOVED"


def test_a_local_ray_runs_its_workers_at_the_niceness_of_other_processes(ray_local) -> None:
    """Ray's default worker niceness (15) starves trials beside any other busy process
    (`tuning.runtime.ray_cluster.LOCAL_RAY_SYSTEM_CONFIG`); the project's local Ray runs them at 0."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote(), timeout=120) == os.nice(0) == 0
