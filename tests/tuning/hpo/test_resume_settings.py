"""The search command's doors: a resumed search continues the experiment it started, or is refused
naming every changed setting (exit 2, nothing written), before Ray starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfcml.config import ConfigError
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.hpo.driver import STATE_FILE, SearchState
from tuning.hpo.run import SearchRun
from tuning.search import build_run, main, parse_args
from tuning.workflows.search import check_resume

SIZE = (32, 32, 8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("men") / "men", patients=12, seed=0, size=SIZE)
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=SIZE)


def _args(prepared, tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "men", "--search", "smoke", "--data-root", str(prepared.out_dir), "--runs-dir",
            str(tmp_path / "runs"), "--name", "s", *extra]


def _started(prepared, tmp_path: Path, *extra: str) -> Path:
    """The state file a search started with `extra` leaves (what the driver writes first)."""
    run = build_run(parse_args(_args(prepared, tmp_path, *extra)))
    SearchState("parent", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "1",
                run.settings(prepared.fingerprint)).save(run.search_dir)
    return run.search_dir / STATE_FILE


def test_the_state_file_records_every_resolved_setting(prepared, tmp_path: Path) -> None:
    state = json.loads(_started(prepared, tmp_path, "--set", "optim.lr=1e6").read_text())["settings"]
    assert state["optim.lr"] == 1e6 and state["train.image_size"] == list(SIZE)
    assert state["dataset_fingerprint"] == prepared.fingerprint and state["num_samples"] == 2
    assert state["search.space.loss.momentum"] == {"dist": "uniform", "low": 0.0, "high": 0.95, "values": []}


@pytest.mark.parametrize("started,resumed,named", [
    (["--set", "optim.lr=1e6"], [], "optim.lr: 1000000.0 recorded, 0.0005 now"),  # the --set left out
    ([], ["--set", "optim.lr=1e6"], "optim.lr: 0.0005 recorded, 1000000.0 now"),
    ([], ["--num-samples", "5"], "num_samples: 2 recorded, 5 now"),
    ([], ["--max-epochs", "9"], "train.epochs: 2 recorded, 9 now"),
    ([], ["--seed", "3"], "train.seed: 0 recorded, 3 now"),
    ([], ["--set", "model.dim=64", "--workers", "2"], "model.dim: 32 recorded, 64 now; train.workers: 1 recorded"),
])
def test_a_resume_with_other_settings_is_refused_naming_the_keys(prepared, tmp_path: Path, capsys,
                                                                started, resumed, named) -> None:
    state = _started(prepared, tmp_path, *started)
    before = state.read_text()
    assert main(_args(prepared, tmp_path, *resumed, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: search 's' was started with other settings") and named in err
    assert len(err.splitlines()) == 1 and state.read_text() == before  # nothing written


@pytest.mark.parametrize("resumed", [[], ["--cpus-per-worker", "2", "--set", "train.max_failures=5", "--verbose"]])
def test_a_resume_may_change_only_how_trials_run(prepared, tmp_path: Path, resumed) -> None:
    _started(prepared, tmp_path)
    run = build_run(parse_args(_args(prepared, tmp_path, *resumed, "--resume")))
    check_resume(run, SearchState.load(run.search_dir), prepared.fingerprint)  # no error


def test_a_resume_on_other_data_is_refused(prepared, tmp_path: Path) -> None:
    state_file = _started(prepared, tmp_path)
    run = build_run(parse_args(_args(prepared, tmp_path, "--resume")))
    with pytest.raises(ConfigError, match=r"dataset_fingerprint: '[0-9a-f]+' recorded, 'other' now"):
        check_resume(run, SearchState.load(state_file.parent), "other")


def test_a_resume_into_another_tracking_store_is_refused(prepared, tmp_path: Path) -> None:
    state_file = _started(prepared, tmp_path)
    run = SearchRun.build("men", "smoke", data_root=prepared.out_dir, runs_dir=tmp_path / "runs", name="s",
                          tracking_uri=f"sqlite:///{tmp_path / 'elsewhere.db'}", resume=True)
    with pytest.raises(ConfigError, match=r"--tracking-uri .*elsewhere.db is not this search's store"):
        check_resume(run, SearchState.load(state_file.parent), prepared.fingerprint)


def test_grad_cam_of_test_patients_is_an_explicit_option(prepared, tmp_path: Path) -> None:
    """Explanations show test patients' images and fields on the final run: off unless asked."""
    import inspect

    from pipelines.train_final import main as final_main  # noqa: F401  (the flag exists there too)
    from tuning.release.final import train_final

    assert not build_run(parse_args(_args(prepared, tmp_path))).explain_test_patients
    assert build_run(parse_args(_args(prepared, tmp_path, "--explain-test-patients"))).explain_test_patients
    assert inspect.signature(train_final).parameters["explain"].default is False
