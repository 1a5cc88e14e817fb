"""One command at a time on a search (`tuning.runtime.locks`): a second search of the same name, a
--resume of a running search or its final step is refused in one line naming the holder, before
Ray starts; the lock goes with its holder however it ends."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT
from tuning.records.outcome import SearchOutcome
from tuning.runtime.locks import SearchBusy, lock_path, search_lock
from tuning.search import main as search_main

HOLD = """
import sys, time
from pathlib import Path
from tuning.runtime.locks import search_lock
with search_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Another process (as a running search would) holding the lock of search 'men-x' under tmp/runs/ray."""
    storage = tmp_path / "runs" / "ray"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(storage), "men-x"], cwd=PROJECT_ROOT,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _search(tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "men", "--search", "smoke", "--name", "men-x", "--data-root", str(tmp_path / "no-data"),
            "--runs-dir", str(tmp_path / "runs"), *extra]


def _final(tmp_path: Path) -> int:
    from pipelines.train_final import main as final_main

    search_dir = tmp_path / "runs" / "ray" / "men-x"
    search_dir.mkdir(parents=True)
    SearchOutcome("men", "cv_macro_auc", [], str(search_dir), str(tmp_path / "prepared"),
                  f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "1", "r").save()
    return final_main(["--dataset", "men", "--name", "men-x", "--runs-dir", str(tmp_path / "runs")])


@pytest.mark.parametrize("command", ["a second search", "--resume", "train_final"])
def test_a_command_on_a_search_another_process_runs_is_refused_naming_the_holder(
        command: str, holder: subprocess.Popen, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if command == "train_final":
        assert _final(tmp_path) == 2
    else:
        assert search_main(_search(tmp_path, *(["--resume"] if command == "--resume" else []))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: search 'men-x' is in use by another command: PID {holder.pid} on "
                          f"{socket.gethostname()} since ")
    assert f"lock file {lock_path(tmp_path / 'runs' / 'ray', 'men-x')}" in err


def test_the_lock_of_a_killed_holder_is_free_and_the_next_check_speaks(holder: subprocess.Popen, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the OS drops its flock
    holder.wait(timeout=30)
    assert lock_path(tmp_path / "runs" / "ray", "men-x").read_text()  # its holder record is still there
    assert search_main(_search(tmp_path)) == 2
    assert capsys.readouterr().err.startswith("error: --data-root: no dataset at")


def test_a_refused_search_releases_its_lock_and_leaves_no_runs_folder(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    for _ in range(2):  # the second is not refused as busy: the first released the lock as it returned
        assert search_main(_search(tmp_path)) == 2
        assert capsys.readouterr().err.startswith("error: --data-root: no dataset at")
    assert not (tmp_path / "runs").exists()


def test_the_lock_is_released_by_an_exception_or_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()  # a search folder: the lock file stays beside it
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), search_lock(tmp_path, "s"):
            raise exc()
        with search_lock(tmp_path, "s"):
            with pytest.raises(SearchBusy, match=rf"PID {os.getpid()} on "):
                # a second holder in this process: flock locks are per open file, so it is refused too
                with search_lock(tmp_path, "s"):
                    pass
    assert lock_path(tmp_path, "s").read_text() == ""  # no holder recorded
