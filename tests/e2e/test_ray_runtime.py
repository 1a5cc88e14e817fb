"""A local Ray started by the project (`tuning.ray_runtime`) with another Ray running on the same
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


def test_the_janitor_frees_an_unused_train_placement_group_and_keeps_used_and_tune_ones(ray_local) -> None:
    """The placement group a dying Ray Train controller created after its cleaner stopped watching
    (`tuning.placement_groups`): a worker-bundle group no actor uses is removed on the second
    check; one whose actor is alive, one whose actor is still starting, and Tune's trial group
    (`memory` marker) are kept."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tuning.placement_groups import PlacementGroupJanitor

    @ray.remote(num_cpus=0.01)
    class Worker:  # stands for a Ray Train worker
        def __init__(self, start_s: float = 0.0) -> None:
            time.sleep(start_s)

        def ready(self) -> bool:
            return True

    groups: dict = {}
    actors: list = []
    janitor = PlacementGroupJanitor(period_s=0.1)
    try:
        for name, bundle in (("orphan", {"CPU": 0.01}), ("used", {"CPU": 0.01}), ("starting", {"CPU": 0.01}),
                             ("tune_trial", {"memory": 1})):
            groups[name] = placement_group([bundle])
            ray.get(groups[name].ready(), timeout=60)
        on = {name: PlacementGroupSchedulingStrategy(groups[name]) for name in ("used", "starting")}
        actors.append(Worker.options(scheduling_strategy=on["used"]).remote())
        ray.get(actors[0].ready.remote())
        actors.append(Worker.options(scheduling_strategy=on["starting"]).remote(30.0))  # in __init__ for 30 s
        time.sleep(2)  # the starting worker's process is up and in __init__
        first = janitor.sweep()
        assert groups["orphan"].id.hex() not in first  # first seen: a suspect only
        assert groups["orphan"].id.hex() in janitor.sweep()
        states = {name: placement_group_table(pg)["state"] for name, pg in groups.items()}
        assert states == {"orphan": "REMOVED", "used": "CREATED", "starting": "CREATED", "tune_trial": "CREATED"}
        # at the search's end, with no run of it left, an orphan goes on its first sighting
        groups["late"] = placement_group([{"CPU": 0.01}])
        ray.get(groups["late"].ready(), timeout=60)
        janitor.on_experiment_end([])
        assert placement_group_table(groups["late"])["state"] == "REMOVED"
        assert placement_group_table(groups["used"])["state"] == "CREATED"
    finally:
        for actor in actors:
            ray.kill(actor)
        for pg in groups.values():
            if placement_group_table(pg).get("state") != "REMOVED":
                remove_placement_group(pg)
