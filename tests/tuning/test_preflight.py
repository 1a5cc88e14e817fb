"""Before the data is prepared and before Ray starts: an unusable --runs-dir or tracking store is
one line naming it, exit status 2, and nothing written."""
from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT, ConfigError
from cfcml.data.synthetic import make_men
from tuning.preflight import check_storage, tracking_uri_choice, unwritable
from tuning.search import main as search_main


@pytest.fixture(scope="module")
def raw_men(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw (unprepared) dataset: a search that got past the checks would prepare it."""
    return make_men(tmp_path_factory.mktemp("preflight") / "men", patients=12, seed=3, size=(32, 32, 8))


def _refused_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test's stderr to the search's own
        pass


@pytest.fixture(scope="module")
def not_mlflow(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real web server that is not an MLflow tracking server: it serves an empty folder."""
    handler = functools.partial(_Files, directory=str(tmp_path_factory.mktemp("www")))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _search(raw_men: Path, runs_dir: Path, *extra: str) -> list[str]:
    return ["--dataset", "men", "--search", "smoke", "--data-root", str(raw_men), "--runs-dir", str(runs_dir), *extra]


@pytest.mark.parametrize("case", ["refused", "not-mlflow", "sqlite-under-a-file", "runs-dir-under-a-file",
                                  "runs-dir-read-only"])
def test_an_unusable_store_or_runs_dir_is_one_line_exit_2_and_nothing_is_written(
        case: str, raw_men: Path, not_mlflow: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    runs_dir = tmp_path / "runs"
    if case == "refused":
        uri = f"http://127.0.0.1:{_refused_port()}"
        argv, named, reason = _search(raw_men, runs_dir, "--tracking-uri", uri), f"--tracking-uri {uri}", "refused"
    elif case == "not-mlflow":
        argv, named, reason = (_search(raw_men, runs_dir, "--tracking-uri", not_mlflow),
                               f"--tracking-uri {not_mlflow}", "HTTP 404")
    elif case == "sqlite-under-a-file":
        uri = f"sqlite:///{a_file / 'mlflow.db'}"
        argv, named, reason = (_search(raw_men, runs_dir, "--tracking-uri", uri), f"--tracking-uri {uri}",
                               f"{a_file} is a file, not a folder")
    elif case == "runs-dir-under-a-file":
        runs_dir = a_file / "runs"
        argv, named, reason = _search(raw_men, runs_dir), f"--runs-dir {runs_dir}", f"{a_file} is a file"
    else:
        if unwritable(Path("/sys/cfcml-runs")) is None:
            pytest.skip("needs a /sys that takes no files (Linux sysfs)")
        runs_dir = Path("/sys/cfcml-runs")
        argv, named, reason = _search(raw_men, runs_dir), "--runs-dir /sys/cfcml-runs", "/sys is not writable"
    t0 = time.perf_counter()
    assert search_main(argv) == 2
    assert time.perf_counter() - t0 < 15  # a few seconds' connect timeout at most, no MLflow retries
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {named}: ") and reason in err, err
    assert not (raw_men / "prepared").exists()  # the data was not prepared
    assert not (tmp_path / "runs").exists()  # no runs folder, no store


def test_no_ray_starts_when_the_tracking_server_is_unreachable(raw_men: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_refused_port()}"
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}  # where a Ray started here would live
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "tuning" / "search.py"),
                          *_search(raw_men, tmp_path / "runs", "--tracking-uri", uri)],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: --tracking-uri {uri}: MLflow tracking server unreachable "
                                       f"(connection refused at 127.0.0.1:{uri.rsplit(':', 1)[1]})"]
    assert not (tmp_path / "ray").exists() and not (tmp_path / "runs").exists()


def test_the_store_is_the_flag_else_the_environment_else_sqlite_in_the_runs_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri_choice(None, tmp_path) == (f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", "--runs-dir")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri_choice(None, tmp_path) == ("http://127.0.0.1:1", "MLFLOW_TRACKING_URI")
    assert tracking_uri_choice("sqlite:///x.db", tmp_path) == ("sqlite:///x.db", "--tracking-uri")
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI http://127\.0\.0\.1:1: MLflow tracking server"):
        check_storage(tmp_path / "runs", None, timeout=2)
    assert not (tmp_path / "runs").exists()


def test_writable_folders_pass_and_leave_nothing_behind(tmp_path: Path) -> None:
    assert unwritable(tmp_path / "not" / "yet" / "there") is None
    assert list(tmp_path.iterdir()) == []
    assert check_storage(tmp_path / "runs", f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}") == \
        f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_search_names_the_state_file_its_unreachable_store_came_from(raw_men: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    from tuning.driver import STATE_FILE, SearchState

    search_dir = tmp_path / "runs" / "ray" / "men-smoke"
    uri = f"http://127.0.0.1:{_refused_port()}"
    SearchState("run-id", uri, "1").save(search_dir)
    assert search_main(_search(raw_men, tmp_path / "runs", "--resume")) == 2
    assert capsys.readouterr().err.startswith(f"error: {search_dir / STATE_FILE}: tracking_uri {uri}: MLflow "
                                              f"tracking server unreachable")
    assert not (raw_men / "prepared").exists()
