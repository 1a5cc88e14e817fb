"""Starting (or joining) Ray: the one place that calls `ray.init` for the command-line tools.

A local Ray started here gets settings for laptops: Ray Train's controller polls its workers every
2 s by default, which adds seconds to every trial's start and end, and a laptop has no preemptible
nodes to watch. A cluster (`address` given) keeps its own settings.

Two things fail here in one line (`ConfigError`, exit 2 at the entry points) rather than with a
traceback or a wait without end:

- `ray.init` raising anything (a local Ray that timed out during startup on a busy machine, a
  cluster that cannot be joined): `RayStartError`, naming what was started or joined and what to try;
- a trial needing more CPUs or GPUs than the cluster has (`check_cluster_fits`, run before any
  Tuner or Ray Train run starts): `ClusterTooSmall` naming the flags and both figures on a local
  Ray, whose resources are fixed; on a joined cluster, which may autoscale, a warning that says
  how long Ray Train waits for nodes.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any, TextIO

from cfcml.config import PROJECT_ROOT, ConfigError, TrainConfig

LOCAL_RAY_ENV = {
    "PYTHONPATH": str(PROJECT_ROOT),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train gives a worker group 60 s to start, then retries; on a loaded laptop (2 cores, other
    # work running) a worker's first imports alone can take that long, and each retry starts over.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # Every Ray process in UTF-8 mode whatever the locale (LANG=C, LC_ALL=POSIX, no locale at all):
    # paths and names under a hospital's folders carry accents (PEP 540).
    "PYTHONUTF8": "1",
}


# Ray's own settings (RayConfig) of a local Ray. worker_niceness: Ray starts every worker process
# (trial actors, Ray Train controllers and workers) at niceness 15 by default, so that its daemons
# stay responsive on a shared node. On a laptop that also runs other work, every nice-0 process
# then gets about 28 times a worker's share of a core (Linux CFS weights 1024 and 36): beside
# CPU-bound processes on a small machine, trials wait minutes for their workers (measured in
# docs/architecture.md, "Edges"). At 0 a search shares the machine evenly with what else runs; the
# raylet and GCS stay at 0 as well.
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


# Run first in every process of a local Ray (`tuning.runtime.worker_setup`): the cluster's own address
# in RAY_ADDRESS, for Ray's state API when the machine runs more than one Ray.
WORKER_SETUP_HOOK = "tuning.runtime.worker_setup.pin_cluster_address"


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
        "_system_config": dict(LOCAL_RAY_SYSTEM_CONFIG),
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


class RayStartError(ConfigError):
    """`ray.init` failed: a local Ray did not start, or the cluster could not be joined."""


class ClusterTooSmall(ConfigError):
    """A trial needs more CPUs or GPUs than the (fixed) Ray cluster has: it would wait forever."""


# What names each Ray Train resource setting in a message: the config keys (compare.py and
# train_final.py set them with --set or the YAML); search.py passes its own flags.
RESOURCE_FLAGS = {"workers": "train.workers", "cpus_per_worker": "train.cpus_per_worker",
                  "gpus_per_worker": "train.gpus_per_worker"}
SEARCH_FLAGS = {"workers": "--workers", "cpus_per_worker": "--cpus-per-worker",
                "gpus_per_worker": "--gpus-per-worker"}
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_TRAIN_START_TIMEOUT_DEFAULT_S = 60.0  # ray.train.v2._internal.constants.DEFAULT_WORKER_GROUP_START_TIMEOUT_S


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text[:240]}" if text else type(exc).__name__


def start_failure(exc: BaseException, address: str | None, what: str = "--address") -> str:
    """The one line for a failed `ray.init`: what was started or joined, Ray's own first line, and
    what to try."""
    if address:
        return (f"{what} {address}: could not join the Ray cluster ({_first_line(exc)}); check that the "
                f"cluster runs and that this is its address (host:6379, or ray://host:10001), or leave "
                f"{what} out to start a local Ray")
    if "timed out" in str(exc).lower() or isinstance(exc, TimeoutError):
        hint = "the machine is too busy to start Ray in time: run fewer jobs at once and try again"
    else:
        hint = ("run fewer jobs at once, check that Ray's temporary folder ($RAY_TMPDIR, else /tmp) is a "
                "writable folder with free space")
    return (f"Ray did not start on this machine ({_first_line(exc)}); {hint}, or join a running Ray cluster "
            f"with --address")


def shortfall(train: TrainConfig, total: dict[str, float], largest: dict[str, float],
              flags: dict[str, str] | None = None) -> list[str]:
    """What of one trial's Ray Train workers (`train.workers` x `train.cpus_per_worker` CPUs and
    `train.gpus_per_worker` GPUs) a cluster with `total` resources, the most on one node being
    `largest`, cannot hold; empty if it fits. A worker's resources must be on one node; the
    workers may spread over nodes (Ray Train's PACK placement). Tune's trial actor and Ray Train's
    controller reserve no CPU (`tuning.hpo.tuner.build_trainable`; Ray Train starts its controller
    with num_cpus=0)."""
    flags = {**RESOURCE_FLAGS, **(flags or {})}
    out = []
    w = train.workers
    for key, kind in (("cpus_per_worker", "CPU"), ("gpus_per_worker", "GPU")):
        each = float(getattr(train, key))
        if each <= 0:
            continue
        need, have, node = w * each, float(total.get(kind, 0)), float(largest.get(kind, 0))
        if need > have + 1e-9:
            out.append(f"{flags['workers']} {w} x {flags[key]} {each:g}: a trial needs {need:g} "
                       f"{kind}{'' if need == 1 else 's'}, the cluster has {have:g}")
        elif each > node + 1e-9:
            out.append(f"{flags[key]} {each:g}: one worker needs {each:g} {kind}{'' if each == 1 else 's'} on one "
                       f"node, the largest node has {node:g}")
    return out


def cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    """(the running Ray cluster's total resources, the most of each on one alive node)."""
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for key, value in node.get("Resources", {}).items():
                largest[key] = max(largest.get(key, 0.0), float(value))
    return total, largest


def check_cluster_fits(train: TrainConfig, *, joined: str | None = None, flags: dict[str, str] | None = None,
                       warn: TextIO | None = None) -> None:
    """Before any Tuner or Ray Train run starts: a trial's workers fit on the running cluster.

    On a local Ray (`joined` None), whose resources are fixed, raise ClusterTooSmall: one line
    naming the flags and both figures. A joined cluster (`joined`: its address) may add nodes (an
    autoscaler), so its shortfall is a warning (to `warn`, default stderr) saying that the trials
    wait for nodes and for how long Ray Train waits before it counts a failed start."""
    import sys

    problems = shortfall(train, *cluster_resources(), flags)
    if not problems:
        return
    if joined is None:
        raise _local_too_small(problems)
    timeout = os.environ.get(START_TIMEOUT_ENV) or f"{RAY_TRAIN_START_TIMEOUT_DEFAULT_S:g}"
    print(f"warning: {'; '.join(problems)} (the cluster at {joined}, now); each trial waits for an autoscaler "
          f"to add nodes, up to {timeout} s ({START_TIMEOUT_ENV}) per start of its workers, then fails that "
          f"start (retried train.max_failures times)", file=warn or sys.stderr)


def _local_too_small(problems: list[str]) -> ClusterTooSmall:
    return ClusterTooSmall(f"{'; '.join(problems)} (a local Ray: this machine's CPUs and GPUs); the trials "
                           f"would wait forever: lower them, or join a larger cluster with --address")


def local_cpus(num_cpus: int | None = None) -> float:
    """The CPUs a local Ray started with `num_cpus` will have: `num_cpus`, else what Ray detects
    (its own count, which honours container CPU limits), else `os.cpu_count()`."""
    if num_cpus is not None:
        return float(num_cpus)
    try:
        from ray._private.utils import get_num_cpus  # Ray's own detection (private; a fallback below)

        return float(get_num_cpus())
    except Exception:
        return float(os.cpu_count() or 1)


def check_local_fits(train: TrainConfig, num_cpus: int | None = None, flags: dict[str, str] | None = None) -> None:
    """Before a local Ray starts: a trial's workers fit in the CPUs it will have (`local_cpus`).
    Its GPUs are known once it runs (`check_cluster_fits` checks them then). Raises ClusterTooSmall
    with `check_cluster_fits`'s line, so a request that can never run is refused without the
    seconds a Ray start costs."""
    cpus = local_cpus(num_cpus)
    problems = shortfall(train, {"CPU": cpus, "GPU": math.inf}, {"CPU": cpus, "GPU": math.inf}, flags)
    if problems:
        raise _local_too_small(problems)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False,
                train: TrainConfig | None = None, flags: dict[str, str] | None = None) -> Iterator[ModuleType]:
    """Ray for the duration of the block: joins `address` (a cluster, "auto"), else the cluster
    $RAY_ADDRESS names (as `ray.init()` does; "local" = start one), else starts a local Ray, and
    shuts down only what it started. An already initialised Ray (a test's) is used as it is.
    `tuning.runtime.preflight.check_ray_address` checks that address answers before any work starts.

    verbose: forward the workers' logs to this console (Ray Train's per-epoch lines among them).
    train: the Ray Train resources every trial (and the final model, a comparison's variants)
        will ask for: checked against the cluster before the block runs (`check_cluster_fits`,
        `flags` naming the settings in its message).

    Raises RayStartError (a ConfigError: one line) when `ray.init` fails, whatever the reason, and
    ClusterTooSmall when a trial cannot fit on a local Ray.
    """
    import logging

    import ray

    quiet_logs(verbose)
    if ray.is_initialized():
        if train is not None:
            check_cluster_fits(train, flags=flags)
        yield ray
        return
    level = logging.INFO if verbose else logging.WARNING
    from tuning.runtime.preflight import ray_address_choice

    address, what = ray_address_choice(address)
    if train is not None and not address:
        check_local_fits(train, num_cpus, flags)
    try:
        if address:
            ray.init(address=address, log_to_driver=verbose, logging_level=level)
        else:
            # address="local": a new local Ray even when $RAY_ADDRESS is set (ray.init would join it)
            ray.init(address="local", **local_init_kwargs(num_cpus, verbose), logging_level=level)
    except Exception as exc:  # "The current node timed out during startup", a cluster not joined, ...
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever it had started
        raise RayStartError(start_failure(exc, address, what)) from None
    try:
        if train is not None:
            check_cluster_fits(train, joined=address, flags=flags)
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
