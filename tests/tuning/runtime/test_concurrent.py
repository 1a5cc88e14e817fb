"""Several searches at once (tuning/runtime/concurrent.py): how the cluster's slots are shared out,
and child drivers on a real local Ray: their output under their label, their share, the cluster
and runtime environment they join, their failures by kind, and Ctrl-C reaching each running child
once while waiting ones never start."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from tuning.runtime.concurrent import CONFIG, FAILED, INTERRUPTED, SearchJob, lane_shares, run_concurrently

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("slots, searches, shares", [
    (2, 13, [1, 1]),  # a laptop: two searches at once, one trial each
    (8, 3, [3, 3, 2]),  # more slots than searches: every search runs, the slots split
    (1, 4, [1]),
    (4, 1, [4]),
    (5, 2, [3, 2]),
])
def test_the_lanes_shares_add_up_to_the_slots(slots: int, searches: int, shares: list[int]) -> None:
    assert lane_shares(slots, searches) == shares and sum(shares) == slots


@pytest.mark.parametrize("slots, searches", [(0, 3), (2, 0)])
def test_no_slot_or_no_search_is_refused(slots: int, searches: int) -> None:
    with pytest.raises(ValueError):
        lane_shares(slots, searches)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from tuning.runtime.ray_cluster import local_init_kwargs

    if ray.is_initialized():  # an earlier test's Ray on this pytest worker, no longer in use
        ray.shutdown()
    ray.init(address="local", **local_init_kwargs(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture
def jobs_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from cfcml.config import PROJECT_ROOT

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), str(PROJECT_ROOT)]))
    import concurrent_jobs  # noqa: F401 - pickled by reference as this module

    return None


@pytest.mark.timeout(300)
def test_children_join_the_cluster_print_under_their_label_and_report_failures_by_kind(
        local_ray, jobs_on_path, tmp_path: Path) -> None:
    import concurrent_jobs

    lines: list[str] = []
    jobs = [SearchJob("a", concurrent_jobs.report, (str(tmp_path), "a")),
            SearchJob("bad key", concurrent_jobs.refuse, ("train.epochs",)),
            SearchJob("b", concurrent_jobs.report, (str(tmp_path), "b")),
            SearchJob("broken", concurrent_jobs.fail)]
    failures = run_concurrently(jobs, 2, print_line=lines.append)

    assert [(f.label, f.kind) for f in failures] == [("bad key", CONFIG), ("broken", FAILED)]
    assert failures[0].message == "train.epochs: no such value" and failures[1].message == "disk on fire"
    assert "[a] a: first line, Zürich" in lines and "[b] b: second line" in lines
    assert any(line.startswith("[broken] ") and "RuntimeError" in line for line in lines)  # its traceback
    address = local_ray.get_runtime_context().gcs_address
    for name in ("a", "b"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["share"] == 1 and record["pid"] != os.getpid() and record["address"] == address
        # the local Ray's runtime environment reaches the children's tasks too
        assert record["task"] == {"timeout": "300", "niceness": 0}


@pytest.mark.timeout(300)
def test_ctrl_c_reaches_each_running_child_once_and_waiting_ones_never_start(
        local_ray, jobs_on_path, tmp_path: Path) -> None:
    import concurrent_jobs

    jobs = [SearchJob(n, concurrent_jobs.wait_for_ctrl_c, (str(tmp_path), n)) for n in ("x", "y", "z")]

    def press_ctrl_c() -> None:
        deadline = threading.Event()
        while not ((tmp_path / "x.started").exists() and (tmp_path / "y.started").exists()):
            deadline.wait(0.2)
        signal.raise_signal(signal.SIGINT)  # reaches the main thread, inside run_concurrently

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    failures = run_concurrently(jobs, 2, print_line=lambda line: None)
    assert [(f.label, f.kind) for f in failures] == [("x", INTERRUPTED), ("y", INTERRUPTED), ("z", INTERRUPTED)]
    assert failures[2].message == "not started (Ctrl-C)"
    assert (tmp_path / "x.interrupted").exists() and (tmp_path / "y.interrupted").exists()
    assert not (tmp_path / "z.started").exists()


@pytest.mark.timeout(300)
def test_a_child_whose_command_was_killed_interrupts_itself_even_with_sigint_ignored_by_the_command(
        local_ray, jobs_on_path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    command = f"""
import ray, sys
sys.path.insert(0, {str(HERE)!r})
import concurrent_jobs
from tuning.runtime.concurrent import SearchJob, run_concurrently
ray.init(address={local_ray.get_runtime_context().gcs_address!r})
run_concurrently([SearchJob("x", concurrent_jobs.wait_for_ctrl_c, ({str(tmp_path)!r}, "x")),
                  SearchJob("y", concurrent_jobs.wait_for_ctrl_c, ({str(tmp_path)!r}, "y"))], 2)
"""
    # started with SIGINT ignored, as `nohup ... &` in a script starts it: the children still stop
    proc = subprocess.Popen([sys.executable, "-c", command],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while not ((tmp_path / "x.started").exists() and (tmp_path / "y.started").exists()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.kill()  # the command dies outright (SIGKILL): no Ctrl-C is forwarded
    proc.wait()
    deadline = time.monotonic() + 30
    while not ((tmp_path / "x.interrupted").exists() and (tmp_path / "y.interrupted").exists()):
        assert time.monotonic() < deadline, "a child ran on without its command"
        time.sleep(0.2)
