"""Ctrl-C in the middle of a search, then --resume: finished trials are not rerun, the
interrupted one continues from its last checkpoint, and its MLflow run continues (each epoch once,
or, for an epoch trained after the last checkpoint and retrained after the resume, the discarded
point and then the retrained one, named by the run's `cfcml.retrained_epochs` tag).
Its Ray Train snapshot is cut short in between (what a full disk leaves): the resume names it, moves
it aside and the trial still continues from its checkpoint folders."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cfcml.config import PROJECT_ROOT
from tuning.search import main as search_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _epochs_logged(uri: str) -> int:
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("cfcml-men")
        if exp is None:
            return 0
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'trial'")
        return max((int(r.data.metrics.get("epoch", 0)) for r in runs), default=0)
    except Exception:  # the store is still being created
        return 0


def test_interrupt_then_resume(ray_local, men_prepared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--dataset", "men", "--search", "smoke", "--data-root", str(men_prepared.out_dir),
            "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri, "--num-samples", "2",
            "--max-epochs", "8", "--folds", "2", "--no-final"]
    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "tuning" / "search.py"), *args],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while _epochs_logged(uri) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, f"the search ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'search'")
    assert parent.info.status == "KILLED"
    assert parent.data.tags["cfcml.end_reason"].startswith("interrupted with ")
    assert not client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'cv-ensemble'")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'trial'")
    assert trials and all(r.info.status in ("FINISHED", "KILLED") for r in trials)  # none left RUNNING

    # every Ray Train snapshot cut short, as a disk that filled up while writing them leaves them
    snapshots = sorted((tmp_path / "runs" / "ray" / "train").glob("trial_*/checkpoint_manager_snapshot.json"))
    assert snapshots
    for snapshot in snapshots:
        snapshot.write_text(snapshot.read_text()[:20])
    capsys.readouterr()
    assert search_main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    for snapshot in snapshots:
        assert f"warning: {snapshot} is damaged (" in out

    trials = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'trial'")
    assert len(trials) == 2  # the same runs, continued
    for run in trials:
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "cv_macro_auc"))
        tag = client.get_run(run.info.run_id).data.tags.get("cfcml.retrained_epochs", "")
        retrained = sorted(int(e) for e in tag.split(",") if e)
        # every epoch, no gap; a second point only for an epoch retrained after the resume
        assert steps == sorted(list(range(1, max(steps) + 1)) + retrained), (steps, retrained)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    resumed = []
    for result_file in (tmp_path / "runs" / "ray" / "men-smoke").glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        resumed.append(max(r["resumed_from_epoch"] for r in rows))
        for prev, row in zip(rows, rows[1:]):
            if row["epoch"] <= prev["epoch"]:  # a restart: from a checkpoint, never from epoch 1
                assert row["resumed_from_epoch"] >= 1, rows
    assert max(resumed) >= 1  # at least one trial continued from a checkpoint
