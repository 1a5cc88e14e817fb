"""The search driver SIGKILLed in the middle of a search (no handler runs: a lost head node, the OOM
killer), then --resume: the finished trial is not rerun, the interrupted one continues from its
checkpoint, and MLflow ends with one parent run, one run per trial and each epoch once."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from observe import checkpoints, epochs_logged, result_rows, runs, steps

from cfcml.config import PROJECT_ROOT
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome
from tuning.search import main as search_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EPOCHS = 2


def _search_file(tmp_path: Path) -> Path:
    """The smoke search with 2 trials, run one after the other, and no early stopping: the first
    trial has finished and the second is mid-way when the driver dies."""
    raw = yaml.safe_load((PROJECT_ROOT / "conf" / "search" / "smoke.yaml").read_text())
    raw.update(num_samples=2, max_epochs=EPOCHS, grace_period=EPOCHS)
    raw["space"] = {"loss.w_cp": raw["space"]["loss.w_cp"]}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _psutil():
    """psutil as Ray ships it (ray/thirdparty_files, on sys.path once ray is imported)."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _one_trial_at_a_time() -> str:
    """CPUs per worker such that the driver's own local Ray (all this machine's CPUs) fits one trial."""
    from ray._private.utils import get_num_cpus

    return str(get_num_cpus())


def test_a_sigkilled_driver_resumes_without_rerunning_finished_trials_or_duplicating_mlflow(
        ray_local, men_prepared, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_dir = tmp_path / "runs"
    search_dir = runs_dir / "ray" / "men-killed"
    args = ["--dataset", "men", "--search", str(_search_file(tmp_path)), "--data-root", str(men_prepared.out_dir),
            "--runs-dir", str(runs_dir), "--tracking-uri", uri, "--folds", "2", "--no-final",
            "--cpus-per-worker", _one_trial_at_a_time()]
    err = tmp_path / "search.err"
    with err.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "tuning" / "search.py"), *args],
                                cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=err_file)
    psutil = _psutil()
    spawned: list = []
    try:
        deadline = time.time() + 500
        while proc.poll() is None and time.time() < deadline:
            logged = epochs_logged(uri)
            statuses = sorted(status for _, status in logged.values())
            if statuses == ["FINISHED", "RUNNING"] and min(epoch for epoch, _ in logged.values()) >= 1:
                break  # one trial finished, the other has logged an epoch of its own
            time.sleep(0.3)
        assert proc.poll() is None, f"the search ended before it could be killed: {err.read_text()[-2000:]}"
        spawned = psutil.Process(proc.pid).children(recursive=True)  # its local Ray
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        # The local Ray dies with the driver that started it (its trial and Train workers within
        # seconds); Ray's agent processes linger for a while: ours to stop.
        _, alive = psutil.wait_procs(spawned, timeout=5)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)
    assert proc.returncode == -signal.SIGKILL

    before = epochs_logged(uri)
    (finished,) = [name for name, (_, status) in before.items() if status == "FINISHED"]
    client = MlflowClient(uri)
    finished_run = next(r for r in runs(uri, "trial") if r.info.run_name == finished)
    finished_history = [(m.step, m.value, m.timestamp)
                        for m in client.get_metric_history(finished_run.info.run_id, "cv_macro_auc")]
    rows_before = result_rows(search_dir)
    checkpoints_before = checkpoints(runs_dir / "ray" / "train")
    (parent,) = runs(uri, "search")
    assert parent.info.status == "RUNNING"  # nothing could mark it: the driver died outright

    assert search_main(args + ["--resume"]) == 0

    assert [r.info.run_id for r in runs(uri, "search")] == [parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    trials = runs(uri, "trial")
    assert sorted(r.info.run_name for r in trials) == sorted(before)  # the same two runs, continued
    for run in trials:
        assert run.info.status == "FINISHED"
        assert steps(client, run.info.run_id, "cv_macro_auc") == list(range(1, EPOCHS + 1))  # each epoch once
    # the finished trial did not run again: same MLflow points, same Tune rows, no new checkpoint
    assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(finished_run.info.run_id,
                                                                              "cv_macro_auc")] == finished_history
    rows_after = result_rows(search_dir)
    trial_id = finished_run.data.tags["cfcml.trial_id"]
    (finished_dir,) = [name for name in rows_after if trial_id in name]
    assert rows_after[finished_dir] == rows_before[finished_dir]
    assert checkpoints(runs_dir / "ray" / "train")[f"trial_{trial_id}"] == checkpoints_before[f"trial_{trial_id}"]
    # the interrupted trial continued from its checkpoint instead of starting over
    (resumed_dir,) = [name for name in rows_after if name != finished_dir]
    epochs = [r["epoch"] for r in rows_after[resumed_dir]]
    assert epochs == sorted(set(epochs)) and epochs[-1] == EPOCHS
    assert rows_after[resumed_dir][-1]["resumed_from_epoch"] >= 1
    assert len(SearchOutcome.load(search_dir / OUTCOME_FILE).trials) == 2
