"""Starting Ray (`tuning.runtime.ray_cluster`; its e2e tests with another Ray on the machine are in
tests/e2e/test_ray_runtime.py): a Ray that does not start, and trials that cannot fit on
the cluster, are one line and exit 2 from every entry point that starts Ray, before any trial."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT, TrainConfig
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.records.outcome import SearchOutcome
from tuning.runtime.ray_cluster import SEARCH_FLAGS, shortfall, start_failure


@pytest.fixture(scope="module")
def men_prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("ray_runtime") / "men", patients=12, seed=0, size=(16, 16, 4))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(16, 16, 4))


@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR of its own (Ray's socket paths must stay within 107 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix="cfr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _command(entry: str, prepared, runs: Path, *extra: str) -> list[str]:
    data = ["--data-root", str(prepared.out_dir), "--image-size", "16", "16", "4", "--folds", "2"]
    if entry == "search":
        return ["tuning/search.py", "--dataset", "men", "--search", "smoke", *data, "--runs-dir", str(runs), *extra]
    if entry == "compare":
        return ["tuning/compare.py", "--dataset", "men", "--search", "smoke", "--variants", "cfcml", "--seeds", "1",
                *data, "--runs-dir", str(runs), *extra]
    # train_final on a finished search's outcome (no trial scored: the step gets as far as Ray)
    search_dir = runs / "ray" / "men-done"
    search_dir.mkdir(parents=True)
    SearchOutcome("men", "cv_macro_auc", [], str(search_dir), str(prepared.out_dir),
                  f"sqlite:///{runs / 'mlflow.db'}", "1", "r").save()
    return ["pipelines/train_final.py", "--dataset", "men", "--name", "men-done", "--runs-dir", str(runs), *extra]


def _run(argv: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        environ.pop(key, None)
    return subprocess.run([sys.executable, *argv], cwd=PROJECT_ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)


def _error_lines(stderr: str) -> list[str]:
    """The command's own lines (Ray prints a warning of its own as it starts)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "Traceback"))]


@pytest.mark.parametrize("entry", ["search", "compare", "train_final"])
def test_ray_that_does_not_start_is_one_line_exit_2_from_every_entry_point(entry: str, men_prepared,
                                                                           tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    out = _run(_command(entry, men_prepared, tmp_path / "runs"), tmp_path, RAY_TMPDIR=str(not_a_folder / "ray"))
    assert out.returncode == 2, out.stderr
    assert _error_lines(out.stderr) == [
        f"error: Ray did not start on this machine (NotADirectoryError: [Errno 20] Not a directory: "
        f"'{not_a_folder / 'ray'}'); run fewer jobs at once, check that Ray's temporary folder ($RAY_TMPDIR, "
        f"else /tmp) is a writable folder with free space, or join a running Ray cluster with --address"], out.stderr


def test_a_startup_timeout_says_the_machine_is_busy_and_a_failed_join_names_the_address() -> None:
    timed_out = Exception("The current node timed out during startup. This could happen because some of the "
                          "Ray processes failed to startup.\nmore")
    assert start_failure(timed_out, None) == (
        "Ray did not start on this machine (Exception: The current node timed out during startup. This could "
        "happen because some of the Ray processes failed to startup.); the machine is too busy to start Ray in "
        "time: run fewer jobs at once and try again, or join a running Ray cluster with --address")
    line = start_failure(ConnectionError("could not connect to GCS"), "10.0.0.5:6379", "RAY_ADDRESS")
    assert line.startswith("RAY_ADDRESS 10.0.0.5:6379: could not join the Ray cluster (ConnectionError: could not "
                           "connect to GCS); ") and "\n" not in line


@pytest.mark.parametrize(("train", "total", "largest", "expected"), [
    (TrainConfig(workers=4), {"CPU": 2}, {"CPU": 2},
     ["--workers 4 x --cpus-per-worker 1: a trial needs 4 CPUs, the cluster has 2"]),
    (TrainConfig(workers=2, cpus_per_worker=0.5), {"CPU": 1}, {"CPU": 1}, []),
    (TrainConfig(workers=2, cpus_per_worker=3), {"CPU": 8}, {"CPU": 4}, []),  # one worker a node
    (TrainConfig(workers=2, cpus_per_worker=3), {"CPU": 8}, {"CPU": 2},
     ["--cpus-per-worker 3: one worker needs 3 CPUs on one node, the largest node has 2"]),
    (TrainConfig(workers=1, gpus_per_worker=1), {"CPU": 16}, {"CPU": 16},
     ["--workers 1 x --gpus-per-worker 1: a trial needs 1 GPU, the cluster has 0"]),
    (TrainConfig(workers=2, cpus_per_worker=2, gpus_per_worker=0.5), {"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1},
     ["--workers 2 x --cpus-per-worker 2: a trial needs 4 CPUs, the cluster has 2"]),
])
def test_a_trial_fits_when_all_its_workers_fit_on_the_cluster_and_each_on_one_node(
        train: TrainConfig, total: dict, largest: dict, expected: list[str]) -> None:
    assert shortfall(train, total, largest, SEARCH_FLAGS) == expected


@pytest.mark.parametrize(("entry", "extra", "expected"), [
    ("search", ["--workers", "1000"], "error: --workers 1000 x --cpus-per-worker 1: a trial needs 1000 CPUs, "),
    ("search", ["--cpus-per-worker", "1000"], "error: --workers 1 x --cpus-per-worker 1000: a trial needs 1000 CPUs, "),
    ("compare", ["--set", "train.workers=1000"],
     "error: train.workers 1000 x train.cpus_per_worker 1: a trial needs 1000 CPUs, "),
])
def test_trials_a_local_ray_cannot_hold_are_refused_in_one_line_before_any_trial(
        entry: str, extra: list[str], expected: str, men_prepared, tmp_path: Path, ray_tmp: Path) -> None:
    runs = tmp_path / "runs"
    out = _run(_command(entry, men_prepared, runs, *extra), tmp_path, RAY_TMPDIR=str(ray_tmp))
    assert out.returncode == 2, out.stderr
    (line,) = _error_lines(out.stderr)
    assert line.startswith(expected) and line.endswith(
        "(a local Ray: this machine's CPUs and GPUs); the trials would wait forever: lower them, or join a larger "
        "cluster with --address"), line
    assert not (runs / "mlflow.db").exists()  # no run was started
    assert not list((runs / "ray").glob("*/cfcml_search.json"))
    assert not list(ray_tmp.glob("**/session_*"))  # refused before a local Ray started (CPUs are known)


JOINED = """
import io, ray
from cfcml.config import TrainConfig
from tuning.runtime.ray_cluster import check_cluster_fits, local_init_kwargs
ray.init(**local_init_kwargs(num_cpus=1))
out = io.StringIO()
check_cluster_fits(TrainConfig(workers=3), joined="10.0.0.5:6379", warn=out)
print(out.getvalue(), end="")
ray.shutdown()
"""


def test_a_joined_cluster_too_small_for_a_trial_is_a_warning_that_says_how_long_ray_train_waits(
        tmp_path: Path, ray_tmp: Path) -> None:
    out = _run(["-c", JOINED], tmp_path, RAY_TMPDIR=str(ray_tmp), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "warning: train.workers 3 x train.cpus_per_worker 1: a trial needs 3 CPUs, the cluster has 1 (the cluster at "
        "10.0.0.5:6379, now); each trial waits for an autoscaler to add nodes, up to 120 s "
        "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) per start of its workers, then fails that start (retried "
        "train.max_failures times)\n")
