"""What every process of a local Ray started by this project runs first (Ray's
`runtime_env["worker_process_setup_hook"]`, set by `tuning.runtime.ray_cluster.local_runtime_env`).

Kept apart from `tuning.runtime.ray_cluster` so that the hook imports nothing but Ray, which the process
has already loaded.
"""
from __future__ import annotations


def pin_cluster_address() -> None:
    """Set `RAY_ADDRESS` in this Ray process to the cluster it belongs to, unless already set.

    Ray's state API (`ray.util.state`) finds its cluster from `RAY_ADDRESS`, else by looking for
    running Ray instances on the machine, and raises `ConnectionError` when it finds more than one
    (another user's Ray, a test's, a second search). Ray Train's `PlacementGroupCleaner` asks that
    API whether its controller is alive, so that it can free the controller's placement group when
    the controller dies without shutting its workers down, as when Tune stops a trial (ASHA, the
    last epoch). With two Ray instances on a machine its query raised, the cleaner stopped, the
    dead trial's workers' CPUs stayed reserved, and the next trial's workers waited for them until
    Ray Train's start timeout (`tests/e2e/test_ray_runtime.py`).
    """
    import os

    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
