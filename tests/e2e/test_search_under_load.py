"""A search on a busy machine, as a hospital names things: more CPU-bound processes than cores run
beside it the whole time, its folders and name carry accents, and the process locale is C.

- Under load: the placement-group janitor of 2026-11-30 took live trials' CPUs and `make demo` hung
  2 times in 2 (docs/architecture.md, "Edges"). The search finishes, the watchdog's default never
  fires, and every MLflow run ends FINISHED.
- Beyond ASCII: `--runs-dir`, `--data-root` and `--name` with accents, no UTF-8 locale and
  PYTHONIOENCODING unset. It failed after every trial had run: Ray Train tags its metrics with the
  run's name and Ray encodes tags as ASCII (`tuning.hpo.trainer.ray_train_name`); the final model's
  run was the one that failed, so the search goes through its final model.

One search proves both (each alone cost a search's start-up: the suite's time, issue 26).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cfcml.config import PROJECT_ROOT

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


def test_a_search_with_accented_folders_under_the_c_locale_beside_more_busy_processes_than_cores_finishes(
        men_prepared, tmp_path: Path, cpu_hogs: int) -> None:
    data = shutil.copytree(men_prepared.out_dir, tmp_path / "Klinik Düsseldorf" / "präpariert")
    runs, name = tmp_path / "rüns", "süche-Ñúñez"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(LANG="C", LC_ALL="C", PYTHONPATH=str(PROJECT_ROOT))
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "tuning/search.py", "--dataset", "men", "--search", "smoke", "--data-root",
                          str(data), "--runs-dir", str(runs), "--name", name, "--folds", "2", "--image-size", "32",
                          "32", "8", "--num-samples", "2", "--max-epochs", "1"], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, encoding="utf-8", timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stalled" not in out.stdout  # the watchdog's generous default never fired
    assert "=== final model" in out.stdout and (runs / "ray" / name / "outcome.json").is_file()

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cfcml-men")
    runs_found = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("cfcml.kind") for r in runs_found) == ["final", "search", "trial", "trial"]
    assert {r.info.status for r in runs_found} == {"FINISHED"}  # none left RUNNING
    (final,) = [r for r in runs_found if r.data.tags["cfcml.kind"] == "final"]
    assert "test_macro_auc" in final.data.metrics
    (parent,) = [r for r in runs_found if r.data.tags["cfcml.kind"] == "search"]
    assert parent.info.run_name == name
    assert client.list_artifacts(parent.info.run_id)  # artifacts under the accented runs folder
