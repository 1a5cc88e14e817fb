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
from tuning.runtime.preflight import check_name, check_storage, tracking_uri_choice, unwritable
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
    from tuning.hpo.driver import STATE_FILE, SearchState

    search_dir = tmp_path / "runs" / "ray" / "men-smoke"
    uri = f"http://127.0.0.1:{_refused_port()}"
    SearchState("run-id", uri, "1").save(search_dir)
    assert search_main(_search(raw_men, tmp_path / "runs", "--resume")) == 2
    assert capsys.readouterr().err.startswith(f"error: {search_dir / STATE_FILE}: tracking_uri {uri}: MLflow "
                                              f"tracking server unreachable")
    assert not (raw_men / "prepared").exists()


# ------------------------------------------------------------------ names (issue 18, point 1)

@pytest.mark.parametrize(("name", "reason"), [
    ("x" * 300, "300 bytes long; at most 223"),
    ("é" * 112, "224 bytes long"),  # 112 characters, but 224 bytes in UTF-8
    ("", "empty"),
    ("   ", "empty"),
    ("a/b", "path separator '/'"),
    ("a\\b", "path separator '\\\\'"),
    ("..", "its parent"),
    (".", "the folder itself"),
    ("a\x00b", "control character"),
    ("tab\there", "control character"),
    ("-x", "starts with '-'"),
    (" padded", "starts or ends with a space"),
    ("it's \"mine\"", "both an apostrophe and a double quote"),
])
def test_a_name_no_folder_or_filter_can_hold_is_one_line_exit_2_before_anything_starts(
        name: str, reason: str, raw_men: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert search_main(_search(raw_men, tmp_path / "runs", f"--name={name}")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --name {name!r}: ") and reason in err, err
    assert not (raw_men / "prepared").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["it's mine", 'the "best" one', "ünïcødé 検索", "x" * 223, "a.b-c_d (2)"])
def test_names_with_quotes_spaces_and_letters_of_any_script_are_accepted(name: str, tmp_path: Path) -> None:
    from tuning.hpo.run import SearchRun

    run = SearchRun.build("men", "smoke", runs_dir=tmp_path / "runs", name=name)
    assert run.search_dir == (tmp_path / "runs" / "ray" / name).resolve()
    assert check_name(name) == name


def test_a_runs_dir_too_deep_for_the_names_below_it_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200)
    with pytest.raises(ConfigError, match=r"exceeds PATH_MAX"):
        check_name("x" * 200, parent=deep / ("g" * 200) / ("h" * 200) / ("i" * 200) / ("j" * 200)
                   / ("k" * 200) / ("l" * 200) / ("m" * 200) / ("n" * 200) / ("o" * 200) / ("p" * 200)
                   / ("q" * 200) / ("r" * 200) / ("s" * 200) / ("t" * 200) / ("u" * 200) / ("v" * 200))


def test_compare_and_train_final_check_their_names_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.train_final import main as final_main
    from tuning.compare import main as compare_main

    assert compare_main(["--dataset", "men", "--name", "a/b", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith("error: --name 'a/b': holds the path separator")
    assert compare_main(["--dataset", "men", "--from-search", "../x", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith("error: --from-search '../x': holds the path separator")
    assert final_main(["--dataset", "men", "--name", "..", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith("error: --name '..': names the folder itself or its parent")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------ the tracking store's state (issue 18, point 2)

def test_a_deleted_experiment_is_named_in_one_line_before_any_work(raw_men: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("cfcml-men", (tmp_path / "artifacts").as_uri())
    client.delete_experiment(exp_id)  # what the UI's delete does
    capsys.readouterr()  # MLflow's own lines from creating the store above
    assert search_main(_search(raw_men, tmp_path / "runs", "--tracking-uri", uri)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: --tracking-uri {uri}: the MLflow experiment 'cfcml-men' (id {exp_id}) is deleted; "
                          f"restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {exp_id})")
    assert not (raw_men / "prepared").exists() and not (tmp_path / "runs").exists()
    client.restore_experiment(exp_id)  # restored, the same store passes
    assert check_storage(tmp_path / "runs", uri, experiment="cfcml-men") == uri


def test_a_store_not_created_yet_is_not_created_by_the_experiment_check(tmp_path: Path) -> None:
    from tuning.runtime.preflight import check_experiment

    check_experiment(f"sqlite:///{tmp_path / 'new.db'}", "cfcml-men")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ the Ray environment (issue 18, point 3)

def test_an_unreachable_ray_address_is_named_within_seconds_flag_or_environment(
        raw_men: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    port = _refused_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    assert search_main(_search(raw_men, tmp_path / "runs")) == 2
    assert time.perf_counter() - t0 < 15
    assert capsys.readouterr().err == (f"error: RAY_ADDRESS 127.0.0.1:{port}: no Ray cluster answers there "
                                       f"(connection refused at 127.0.0.1:{port}); unset RAY_ADDRESS to start a "
                                       f"local Ray, or pass --address\n")
    assert not (raw_men / "prepared").exists()
    monkeypatch.delenv("RAY_ADDRESS")
    assert search_main(_search(raw_men, tmp_path / "runs", "--address", f"ray://127.0.0.1:{port}")) == 2
    assert capsys.readouterr().err.startswith(f"error: --address ray://127.0.0.1:{port}: no Ray cluster answers")


def test_the_ray_address_is_the_flag_else_the_environment_else_a_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuning.runtime.preflight import check_ray_address, ray_address_choice

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address_choice(None) == (None, "--address")
    assert check_ray_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address_choice(None) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert ray_address_choice("auto") == ("auto", "--address")
    assert ray_address_choice("local") == (None, "--address")  # local: a new local Ray, $RAY_ADDRESS or not
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_address_choice(None) == (None, "--address")
    with socket.socket() as listening:  # something answers: accepted
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert check_ray_address(address) == address
    with pytest.raises(ConfigError, match="not a Ray address"):
        check_ray_address("ray://:10001")


# ------------------------------------------------------------- free space (issue 18, point 4)

def test_too_little_free_space_for_the_search_is_refused_with_both_figures(tmp_path: Path) -> None:
    import shutil

    from tuning.runtime.preflight import SPACE_FLOOR_BYTES, check_free_space, search_bytes

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ConfigError, match=rf"^--runs-dir {tmp_path / 'runs'}: \d+ MB free on its disk, about "
                                          rf"{round((free + 2**30) / 2**20)} MB needed"):
        check_free_space(tmp_path / "runs", free + 2**30)
    check_free_space(tmp_path / "runs", SPACE_FLOOR_BYTES)
    # every trial's two kept checkpoints of every fold dominate: 12 bytes a parameter a fold
    assert search_bytes(10**6, 5, 20) - search_bytes(10**6, 5, 10) == 10 * 2 * 5 * 12 * 10**6
    assert search_bytes(0, 5, 10) == SPACE_FLOOR_BYTES


@pytest.mark.parametrize("searches,cv_runs", [(3, 0), (1, 4), (4, 6)])
def test_outer_searches_variant_searches_and_further_cv_runs_each_add_their_checkpoints(searches, cv_runs) -> None:
    """--outer-folds K: 1 + K searches; --tune-each: a search per variant; what tuning bought and a
    comparison's variants x seeds: cross-validation runs keeping 3 checkpoints of every fold."""
    from tuning.runtime.preflight import SPACE_FLOOR_BYTES, search_bytes

    one = search_bytes(10**6, 5, 10) - SPACE_FLOOR_BYTES
    assert search_bytes(10**6, 5, 10, searches=searches, cv_runs=cv_runs) - SPACE_FLOOR_BYTES == \
        searches * one + cv_runs * 3 * 5 * 12 * 10**6
    assert search_bytes(10**6, 5, 0, searches=0, cv_runs=cv_runs) - SPACE_FLOOR_BYTES == cv_runs * 3 * 5 * 12 * 10**6


# ------------------------------------------- paths and names beyond ASCII (issue 19, point 6)

@pytest.mark.parametrize("flag", ["--runs-dir", "--name", "--data-root"])
def test_a_path_or_name_beyond_ascii_is_refused_in_one_line_where_python_does_not_write_utf8(
        flag: str, raw_men: Path, tmp_path: Path) -> None:
    accented = {"--runs-dir": str(tmp_path / "rüns"), "--name": "süche", "--data-root": str(tmp_path / "dätä")}
    args = _search(raw_men, tmp_path / "runs")
    if flag == "--name":
        args += ["--name", accented[flag]]
    else:
        args[args.index(flag) + 1] = accented[flag]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    env.update(LANG="C", LC_ALL="C", PYTHONUTF8="0", RAY_TMPDIR=str(tmp_path / "ray"))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "tuning" / "search.py"), *args], cwd=PROJECT_ROOT,
                         env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"error: {flag} ") and line.endswith(
        "holds letters beyond ASCII, and this Python reads and writes file names as ascii (locale C, UTF-8 mode "
        "off); run it with PYTHONUTF8=1 (or LC_ALL=C.UTF-8) so that every process writes them as UTF-8"), line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ray").exists()


def test_paths_and_names_beyond_ascii_pass_where_python_writes_utf8(tmp_path: Path) -> None:
    from tuning.runtime.preflight import check_utf8

    assert sys.getfilesystemencoding() == "utf-8"  # the tests' own locale (C.UTF-8) or UTF-8 mode
    check_utf8(("--runs-dir", tmp_path / "rüns"), ("--name", "Ñúñez 患者"), ("--data-root", None))
