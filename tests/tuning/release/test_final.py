"""The final step reads the registry, not a tag: a registered model deleted after the search is
registered again from the run's logged model (or the step says it is gone and trains again).
Against a real MLflow store (SQLite in tmp) and a real, small logged pyfunc model."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cfcml.config import load_experiment
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.records.outcome import SearchOutcome, TrialResult
from tuning.release.final import REGISTERED_TAG, Release, registered_version, train_final


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"p": [0.5] * len(model_input)})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("final") / "men", patients=12, seed=5, size=(16, 16, 4))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(16, 16, 4))


def _registered_final_run(tmp_path: Path, kind: str = "final", log_model: bool = True) -> tuple[MlflowClient,
                                                                                                 SearchOutcome, str]:
    """A finished search whose `kind` run logged a model and registered it as cfcml-men."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cfcml-men", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"cfcml.kind": "search"}).info.run_id
    search_dir = str(tmp_path / "it's runs" / "ray" / "men-smoke")
    run_id = client.create_run(exp, tags={"cfcml.kind": kind, "cfcml.search": search_dir,
                                          "mlflow.parentRunId": parent}).info.run_id
    for name, value in {"test_accuracy": 0.75, "test_accuracy_ci_low": 0.5, "test_accuracy_ci_high": 0.9}.items():
        client.log_metric(run_id, name, value)
    if log_model:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), registered_model_name="cfcml-men",
                                           pip_requirements=["mlflow"])
        client.set_tag(run_id, REGISTERED_TAG, str(info.registered_model_version))
    else:
        client.set_tag(run_id, REGISTERED_TAG, "1")
    client.set_terminated(run_id, "FINISHED")
    best = TrialResult(trial_id="abcd1234", score=0.8, epoch=3, metrics={"cv_macro_auc": 0.8},
                       experiment=load_experiment("men"))
    outcome = SearchOutcome(dataset="men", metric="cv_macro_auc", trials=[best], search_dir=search_dir,
                            prepared_dir="", tracking_uri=uri, experiment_id=exp, parent_run_id=parent)
    return client, outcome, run_id


def test_a_deleted_registered_model_is_registered_again_from_the_runs_logged_model(
        prepared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    client, outcome, run_id = _registered_final_run(tmp_path)
    registered = Release("final", run_id, "cfcml-men", "1", reused=True)  # nothing trained, tested or written
    assert train_final(prepared, outcome, storage=tmp_path / "ray") == registered  # registered: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    client.delete_registered_model("cfcml-men")  # the registry's delete, after the search

    assert train_final(prepared, outcome, storage=tmp_path / "ray") == registered
    out = capsys.readouterr().out
    assert f"cfcml-men version 1 of run {run_id} is gone from the registry (deleted); registering the run's " \
           f"logged model again" in out
    (version,) = client.search_model_versions("name = 'cfcml-men'")
    assert version.run_id == run_id
    assert version.tags["stage"] == "final" and version.tags["test_accuracy"] == "0.7500 [0.5000, 0.9000]"
    assert client.get_run(run_id).data.tags[REGISTERED_TAG] == str(version.version)
    assert client.get_run(run_id).info.status == "FINISHED"
    model = mlflow.pyfunc.load_model("models:/cfcml-men/latest")  # what predict serves works again
    assert model.predict(pd.DataFrame({"x": [1, 2]}))["p"].tolist() == [0.5, 0.5]


def test_a_deleted_version_whose_run_has_another_version_uses_that_one(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    client, outcome, run_id = _registered_final_run(tmp_path, kind="cv-ensemble")
    second = client.create_model_version("cfcml-men", f"runs:/{run_id}/model", run_id)
    client.delete_model_version("cfcml-men", "1")
    assert registered_version(client, run_id, "cfcml-men") == str(second.version) == "2"
    assert "version 1 of run" in capsys.readouterr().out and client.get_run(run_id).data.tags[REGISTERED_TAG] == "2"


def test_a_gone_version_without_a_logged_model_is_said_and_trained_again(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    client, outcome, run_id = _registered_final_run(tmp_path, kind="cv-ensemble", log_model=False)
    assert registered_version(client, run_id, "cfcml-men") is None  # the caller trains and registers it
    out = capsys.readouterr().out
    assert "gone from the registry" in out and "training and registering it again" in out


def test_a_registered_cv_ensemble_is_returned_as_its_release_untested(prepared, tmp_path: Path) -> None:
    from dataclasses import replace

    from tuning.release.final import register_cv_ensemble

    client, outcome, run_id = _registered_final_run(tmp_path, kind="cv-ensemble")
    outcome.trials = [replace(outcome.trials[0], checkpoint_path=str(tmp_path / "not-read"))]
    release = register_cv_ensemble(prepared, outcome)
    assert release == Release("cv-ensemble", run_id, "cfcml-men", "1", reused=True)
    assert not release.test_split_used and release.test is None and release.card is None


def test_a_release_says_whether_the_test_split_was_used_and_refuses_test_figures_on_an_ensemble() -> None:
    from cfcml.evaluation.metrics import Estimate

    final = Release("final", "r1", "cfcml-men", "2", test={"macro_auc": Estimate(0.8, 0.7, 0.9)}, card="# card")
    assert final.test_split_used and final.test["macro_auc"].point == 0.8 and not final.reused
    assert Release("final", "r1", "cfcml-men", "2", reused=True).test_split_used  # tested by an earlier run
    assert not Release("cv-ensemble", "r2", "cfcml-men", "3").test_split_used
    with pytest.raises(ValueError, match=r"^Release.test: a cv-ensemble is never tested"):
        Release("cv-ensemble", "r2", "cfcml-men", "3", test={"macro_auc": Estimate(0.8, 0.7, 0.9)})
    with pytest.raises(ValueError, match=r"^Release.stage: 'best' is not one of \('final', 'cv-ensemble'\)"):
        Release("best", "r3", "cfcml-men", "1")
    with pytest.raises(AttributeError):  # frozen: what was registered does not change afterwards
        final.version = "3"  # type: ignore[misc]
