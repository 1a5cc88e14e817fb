"""Starting (or joining) Ray: the one place that calls `ray.init` for the command-line tools.

A local Ray started here gets settings for laptops: Ray Train's controller polls its workers every
2 s by default, which adds seconds to every trial's start and end, and a laptop has no preemptible
nodes to watch. A cluster (`address` given) keeps its own settings.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from cfcml.config import PROJECT_ROOT

LOCAL_RAY_ENV = {
    "PYTHONPATH": str(PROJECT_ROOT),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train gives a worker group 60 s to start, then retries; on a loaded laptop (2 cores, other
    # work running) a worker's first imports alone can take that long, and each retry starts over.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}


# Run first in every process of a local Ray (`tuning.ray_worker_setup`): the cluster's own address
# in RAY_ADDRESS, for Ray's state API when the machine runs more than one Ray.
WORKER_SETUP_HOOK = "tuning.ray_worker_setup.pin_cluster_address"


def local_runtime_env() -> dict[str, Any]:
    """The runtime environment of a local Ray: `LOCAL_RAY_ENV` and `WORKER_SETUP_HOOK` (the hook
    module is found through the `PYTHONPATH` that `LOCAL_RAY_ENV` sets)."""
    return {"env_vars": dict(LOCAL_RAY_ENV), "worker_process_setup_hook": WORKER_SETUP_HOOK}


def local_init_kwargs(num_cpus: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """`ray.init` arguments of a local Ray (also used by tests that start their own)."""
    kwargs: dict[str, Any] = {
        # the dashboard serves the state API that Ray Train uses to clean up after stopped trials
        "include_dashboard": True,
        "log_to_driver": verbose,
        "runtime_env": local_runtime_env(),
    }
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    return kwargs


def quiet_logs(verbose: bool) -> None:
    """The console shows the progress table, one line per finished trial and the summaries; the
    libraries' own INFO lines (Ray's start banner with its colour codes, Tune's state-file notes,
    MLflow's database set-up, Optuna's study notes) only with --verbose. Warnings always show."""
    import logging
    import warnings

    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    except ImportError:
        pass
    if not verbose:  # a resumed trial re-reports its restored epoch once; TPE uses final values only
        warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> Iterator[Any]:
    """Ray for the duration of the block: joins `address` (a cluster, "auto"), else the cluster
    $RAY_ADDRESS names (as `ray.init()` does; "local" = start one), else starts a local Ray, and
    shuts down only what it started. An already initialised Ray (a test's) is used as it is.
    `tuning.preflight.check_ray_address` checks that address answers before any work starts.

    verbose: forward the workers' logs to this console (Ray Train's per-epoch lines among them).
    """
    import logging

    import ray

    quiet_logs(verbose)
    if ray.is_initialized():
        yield ray
        return
    level = logging.INFO if verbose else logging.WARNING
    from tuning.preflight import ray_address_choice

    address = ray_address_choice(address)[0]
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
    else:
        # address="local": a new local Ray even when $RAY_ADDRESS is set (ray.init would join it)
        ray.init(address="local", **local_init_kwargs(num_cpus, verbose), logging_level=level)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the block only (Ray Tune reads some at run time)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
