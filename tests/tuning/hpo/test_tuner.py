"""The parent run and Tuner a search and a comparison share (tuning/hpo/tuner.py), against a real
MLflow store (SQLite in tmp). The search's reuse of an orphaned parent run is tested through the
driver in test_tracking.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.hpo.tuner import create_parent_run, fit_tuner, log_parent_inputs
from tuning.tracking.store import git_commit


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("tuner") / "men", patients=12, seed=5, size=(16, 16, 4))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(16, 16, 4))


def test_a_comparison_parent_run_is_tagged_logged_and_never_reused(prepared, tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    first = create_parent_run(client, runs, "men", "comparison x", kind="comparison", group="compare/x",
                              prepared=prepared)
    run = client.get_run(first.run_id)
    assert run.info.run_name == "comparison x" and first.git_commit == git_commit()
    assert {k: run.data.tags[k] for k in ("cfcml.kind", "cfcml.search", "cfcml.dataset",
                                          "cfcml.dataset_fingerprint", "mlflow.source.git.commit")} == {
        "cfcml.kind": "comparison", "cfcml.search": "compare/x", "cfcml.dataset": "men",
        "cfcml.dataset_fingerprint": prepared.fingerprint, "mlflow.source.git.commit": first.git_commit}
    exp = client.get_experiment(first.experiment_id)
    assert exp.name == "cfcml-men"  # an SQLite store: the artifacts beside it, under --runs-dir
    assert exp.artifact_location == (runs / "mlartifacts" / "cfcml-men").resolve().as_uri()
    log_parent_inputs(client, first.run_id, prepared, {"variants": "cfcml,no_fine", "seeds": 2})
    run = client.get_run(first.run_id)
    assert run.data.params == {"variants": "cfcml,no_fine", "seeds": "2"}
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] and run.data.tags["mlflow.user"]
    # without reuse_without_param every call is a new run, even for a parameterless one
    second = create_parent_run(client, runs, "men", "comparison x", kind="comparison", group="compare/x",
                               prepared=prepared)
    third = create_parent_run(client, runs, "men", "comparison x", kind="comparison", group="compare/x",
                              prepared=prepared)
    assert len({first.run_id, second.run_id, third.run_id}) == 3
    assert second.experiment_id == first.experiment_id


class _EnvReadingTuner:
    """Stands for a `tune.Tuner`: what `fit_tuner` controls is the environment around `fit()`."""

    def fit(self) -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "TUNE_GLOBAL_CHECKPOINT_S")}


@pytest.mark.parametrize("env,during", [
    ({}, {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": None}),  # a comparison
    ({"TUNE_GLOBAL_CHECKPOINT_S": "5"}, {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": "5"}),  # a search
])
def test_the_tuner_runs_with_the_classic_reporter_and_its_environment_for_the_fit_only(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], during: dict[str, str | None]) -> None:
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    assert fit_tuner(_EnvReadingTuner(), **env) == during
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ


class _SignalCatchingTuner:
    """Stands for a `tune.Tuner` whose `fit` installs Tune's stop handlers, as the real one does
    (`ray.tune.tune._setup_signal_catching`), and returns without removing them."""

    def fit(self) -> str:
        from ray.tune.tune import _setup_signal_catching

        _setup_signal_catching()
        return "done"


def test_ctrl_c_after_a_fit_reaches_the_command_again() -> None:
    """Tune leaves its SIGINT handler installed when fit returns (ray-project/ray#37737): the
    first Ctrl-C of the final step after a search would have been swallowed."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    assert fit_tuner(_SignalCatchingTuner()) == "done"
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # KeyboardInterrupt, as before
