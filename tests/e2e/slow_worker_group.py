"""A Ray worker-process setup hook that slows Ray Train's worker-group start where a loaded
machine slows it: between the placement group being ready and the worker actors being submitted
(`WorkerGroup._start_impl` waits on the placement group, then creates the synchronisation actor
and the workers). Used by `test_placement_groups.py` through a task's `runtime_env`, which the
Ray Train controller started inside that task inherits."""
from __future__ import annotations

import os
import time

# seconds the controller waits after its placement group is ready (the janitor of 2026-11-30
# removed a group that no actor used on two checks 2 s apart)
DELAY_S = float(os.environ.get("CFCML_TEST_PG_READY_DELAY_S", "8"))


def slow_placement_group_ready() -> None:
    from ray.train.v2._internal.execution.worker_group import placement_group_handle

    from tuning.runtime.worker_setup import pin_cluster_address

    pin_cluster_address()
    handle = placement_group_handle.DefaultPlacementGroupHandle
    wait = handle.wait

    def slow_wait(self, timeout_seconds=None):
        ready = wait(self, timeout_seconds)
        if ready:
            time.sleep(DELAY_S)
        return ready

    handle.wait = slow_wait
