"""A search on a busy machine: more CPU-bound processes than cores run beside it the whole time
(the placement-group janitor of 2026-11-30 took live trials' CPUs under load and `make demo` hung
2 times in 2). It finishes, every trial's MLflow run ends FINISHED, none is left RUNNING.

Measured on the 2-core machine on 2026-12-07: 120 s with the local Ray's workers at niceness 0
(`tuning.runtime.ray_cluster.LOCAL_RAY_SYSTEM_CONFIG`), 688 s at Ray's default 15."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.search import main as search_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture
def cpu_hogs():
    """One busy-looping process per core, plus one."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 2) + 1)]
    try:
        yield len(hogs)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_a_search_beside_more_busy_processes_than_cores_finishes_and_leaves_no_run_running(
        ray_local, men_prepared, tmp_path: Path, cpu_hogs: int, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--dataset", "men", "--search", "smoke", "--data-root", str(men_prepared.out_dir), "--runs-dir",
            str(tmp_path / "runs"), "--tracking-uri", uri, "--num-samples", "2", "--max-epochs", "1",
            "--name", "busy", "--no-final"]
    assert search_main(args) == 0
    out = capsys.readouterr().out
    assert "stalled" not in out  # the watchdog's generous default never fired

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("cfcml.kind") for r in runs) == ["cv-ensemble", "search", "trial", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
