"""What a search (`tuning.hpo.driver`) and a comparison (`tuning.evidence.comparison`) share: the parent MLflow
run of their Tune experiment, the trainable and the Tuner.

Both run one Ray Tune experiment whose trials become child runs of one parent run in the
dataset's experiment (`tuning.tracking.callbacks.SearchTracker`); building the run and the Tuner here keeps
the two tagged, logged and run the same way. Ray and MLflow are imported inside the functions.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from ray.tune import Callback, ProgressReporter, ResultGrid, Trainable, TuneConfig, Tuner

    from cfcml.config import TrainConfig
    from cfcml.data.manifest import PreparedDataset
    from tuning.hpo.run import SearchRun


@dataclass(frozen=True)
class ParentRun:
    """A Tune experiment's parent MLflow run."""

    run_id: str
    experiment_id: str
    git_commit: str  # the commit its `mlflow.source.git.commit` tag records


def open_experiment(client: MlflowClient, runs_dir: Path, dataset: str) -> str:
    """The dataset's experiment in `client`'s store (its id), the store's tables and the experiment
    created on first use (with an SQLite store its artifacts go under `runs_dir/mlartifacts`).
    Called once before several searches start at once (`tuning.runtime.concurrent`): two processes
    creating one SQLite store's tables, or one experiment, at the same moment collide."""
    from tuning.tracking.store import experiment_id

    artifacts = runs_dir / "mlartifacts" if client.tracking_uri.startswith("sqlite:") else None
    return experiment_id(client, dataset, artifacts)


def open_store(run: SearchRun) -> str:
    """`open_experiment` for search `run`'s store (its `tracking_uri`, else the runs folder's SQLite
    store) and dataset: called before its search and others start at once in child processes."""
    from mlflow.tracking import MlflowClient

    from tuning.tracking.store import default_tracking_uri

    return open_experiment(MlflowClient(run.tracking_uri or default_tracking_uri(run.runs_dir)), run.runs_dir,
                           run.dataset)


def create_parent_run(client: MlflowClient, runs_dir: Path, dataset: str, name: str, *, kind: str, group: str,
                      prepared: PreparedDataset, reuse_without_param: str | None = None) -> ParentRun:
    """Create the parent run in the dataset's experiment `cfcml-<dataset>` (created on first use;
    with an SQLite store its artifacts go under `runs_dir/mlartifacts`).

    Args:
        client: the tracking store's client.
        runs_dir: the `--runs-dir` folder.
        dataset: the dataset name.
        name: the run name.
        kind: its `cfcml.kind` tag: "search" or "comparison".
        group: its `cfcml.search` tag, what its trial runs are found by: the search folder, or
            "compare/<name>".
        prepared: the prepared dataset, whose name and fingerprint are tagged.
        reuse_without_param: a parameter name. An earlier run with the same `kind` and `group`
            tags that lacks this parameter (its driver died before it logged its parameters) is
            reused instead of creating another; None always creates a run.
    """
    from tuning.tracking.store import find_run, git_commit

    exp_id = open_experiment(client, runs_dir, dataset)
    commit = git_commit()
    run_id = None
    if reuse_without_param is not None:
        run_id = find_run(client, exp_id, **{"cfcml.search": group, "cfcml.kind": kind})
        if run_id is not None and reuse_without_param in client.get_run(run_id).data.params:
            run_id = None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=name, tags={
            "cfcml.kind": kind, "cfcml.search": group, "cfcml.dataset": dataset,
            "cfcml.dataset_fingerprint": prepared.fingerprint, "mlflow.source.git.commit": commit,
        }).info.run_id
    return ParentRun(run_id, exp_id, commit)


def log_parent_inputs(client: MlflowClient, run_id: str, prepared: PreparedDataset, params: dict[str, Any]) -> None:
    """The parent run's source tags and dataset input (`tuning.tracking.store.log_provenance`), then its
    parameters (those not logged yet)."""
    from tuning.tracking.store import log_params, log_provenance

    log_provenance(client, run_id, prepared)
    log_params(client, run_id, params)


def build_trainable(trial: Callable[..., None], **bound: Any) -> type[Trainable] | Callable[..., Any]:
    """`trial(config, **bound)` as a Tune trainable. `bound` goes through Ray's object store
    (`tune.with_parameters`): each trial actor unpickles it, so it should be light to import
    (`tuning.hpo.trial`). The trial actor itself reserves no CPU: the Ray Train workers it starts hold
    the CPUs (and GPUs)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(trial, **bound), {"cpu": 0, "memory": 1})


def build_tuner(trainable: type[Trainable] | Callable[..., Any], *, param_space: dict[str, Any],
                tune_config: TuneConfig, name: str, storage_path: str, callbacks: list[Callback],
                reporter: ProgressReporter, stall_s: float) -> Tuner:
    """A new `tune.Tuner`: experiment `name` under `storage_path`, `callbacks` (the MLflow
    tracker first), a `PlacementGroupJanitor` (`tuning.runtime.placement_groups`: the CPUs of a Ray
    Train run whose controller died) and a `TrialWatchdog` (`tuning.runtime.watchdog`: a trial silent for
    `stall_s` seconds more than the longest silence seen is failed, naming what it waited for),
    `reporter` (a `tune.CLIReporter`) for the console table. A restored Tuner keeps the callbacks
    saved with it."""
    from ray import tune

    from tuning.runtime.placement_groups import PlacementGroupJanitor
    from tuning.runtime.watchdog import TrialWatchdog

    return tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                  callbacks=[*callbacks, PlacementGroupJanitor(), TrialWatchdog(stall_s)],
                                  progress_reporter=reporter, verbose=1),
    )


def fit_tuner(tuner: Tuner, **env: str) -> ResultGrid:
    """`tuner.fit()` (its `ResultGrid`), with the environment variables `env` set for the run only.
    RAY_AIR_NEW_OUTPUT=0 always: Tune's classic table reporter (the tuner's `CLIReporter`).

    The process's SIGINT and SIGUSR1 handlers are put back after it: Tune installs its own for the
    run (a first Ctrl-C stops the experiment gracefully) and leaves them installed when `fit`
    returns (ray-project/ray#37737, #50358), so a Ctrl-C during the final model after a search set
    a flag nobody read and was lost."""
    import signal

    from tuning.runtime.ray_cluster import scoped_env

    signals = [s for s in (signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]
    before = {s: signal.getsignal(s) for s in signals}
    try:
        with scoped_env(RAY_AIR_NEW_OUTPUT="0", **env):
            return tuner.fit()
    finally:
        for s, handler in before.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)


def trial_concurrency(t: TrainConfig) -> int:
    """How many trials with `t`'s Ray Train workers fit on the cluster at once (CPUs and GPUs)."""
    import ray

    res = ray.cluster_resources()
    fits = [res.get("CPU", 1) // max(t.workers * t.cpus_per_worker, 1e-9)]
    if t.gpus_per_worker > 0:
        fits.append(res.get("GPU", 0) // (t.workers * t.gpus_per_worker))
    return max(int(min(fits)), 1)
