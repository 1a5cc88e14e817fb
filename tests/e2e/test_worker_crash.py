"""A Ray Train worker process killed in the middle of a trial (SIGKILL to its pid, what the OOM
killer or a lost node does): Ray Train restarts the worker group from the trial's last checkpoint
(train.max_failures), the search finishes with every trial, and MLflow holds each epoch once, or,
for the epochs trained after the last checkpoint and retrained after the restart, the discarded
point and then the retrained one, named by the run's `cfcml.retrained_epochs` tag. Checkpoints are
written at the first epoch, at each newly selected epoch and at the last one (the default
`train.checkpoint_every` is above this test's epochs), so where the worker dies decides what is
retrained."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from observe import epochs_logged, result_rows, runs, steps

from tuning.records.outcome import lineage
from tuning.search import main as search_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EPOCHS = 3


def _kill_a_worker_after_an_epoch(uri: str, done: threading.Event, killed: dict) -> None:
    """Wait until the trial has logged an epoch, then SIGKILL its live Ray Train worker."""
    import ray
    from ray.util.state import list_actors

    deadline = time.time() + 400
    while not done.is_set() and time.time() < deadline:
        logged = max((epoch for epoch, _ in epochs_logged(uri).values()), default=0)
        if logged >= 1:
            # this test's own Ray: on a shared machine other local Ray instances may be running
            workers = list_actors(address=ray.get_runtime_context().gcs_address,
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers and workers[0].pid:
                killed.update(pid=workers[0].pid, epochs_logged=logged)
                os.kill(workers[0].pid, signal.SIGKILL)
                return
        time.sleep(0.2)


def test_a_killed_train_worker_restarts_from_the_last_checkpoint_and_the_search_completes(
        ray_local, men_prepared, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_dir = tmp_path / "runs"
    args = ["--dataset", "men", "--search", "smoke", "--data-root", str(men_prepared.out_dir),
            "--runs-dir", str(runs_dir), "--tracking-uri", uri, "--num-samples", "1",
            "--max-epochs", str(EPOCHS), "--folds", "2", "--no-final", "--set", "train.max_failures=1"]
    done, killed = threading.Event(), {}
    killer = threading.Thread(target=_kill_a_worker_after_an_epoch, args=(uri, done, killed), daemon=True)
    killer.start()
    try:
        code = search_main(args)
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "the trial finished before a worker could be killed"
    assert code == 0

    (rows,) = result_rows(runs_dir / "ray" / "men-smoke").values()
    assert [r["epoch"] for r in lineage(rows)] == list(range(1, EPOCHS + 1))
    assert rows[0]["resumed_from_epoch"] == 0
    first_run = [r for r in rows if r["resumed_from_epoch"] == 0]
    assert first_run[0]["checkpointed"]  # the first epoch is always the selected one so far
    # the restarted worker group continued from the newest checkpoint, which is at least as new as
    # the newest checkpointed epoch MLflow had when the worker died (a report follows its checkpoint)
    restarts = {r["resumed_from_epoch"] for r in rows} - {0}
    assert len(restarts) == 1, rows
    restart = restarts.pop()
    checkpointed = [r["epoch"] for r in first_run if r["checkpointed"]]
    assert restart in checkpointed, (rows, killed)
    assert restart >= max(e for e in checkpointed if e <= killed["epochs_logged"]), (rows, killed)
    retrained = {r["epoch"] for r in first_run if r["epoch"] > restart}

    (trial,) = runs(uri, "trial")
    assert trial.info.status == "FINISHED"
    client = MlflowClient(uri)
    for key in ("cv_macro_auc", "train_loss_fold0", "system/cpu_utilization_percentage"):
        # each epoch once, and a retrained one a second time (the retrained values come last)
        expected = sorted(list(range(1, EPOCHS + 1)) + sorted(retrained))
        assert steps(client, trial.info.run_id, key) == expected, (key, rows, killed)
    tag = client.get_run(trial.info.run_id).data.tags.get("cfcml.retrained_epochs", "")
    assert {int(e) for e in tag.split(",") if e} == retrained
