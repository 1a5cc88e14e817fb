"""The smoke search end to end: real Ray Tune/Train, real Optuna, real MLflow (SQLite in tmp)."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cfcml.evaluation.calibration import apply_temperature
from tuning.evidence.clinical import fit_from_oof
from tuning.search import main as search_main
from tuning.tracking.store import tag_filter

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _runs(client: MlflowClient, exp_id: str, kind: str):
    return client.search_runs([exp_id], filter_string=tag_filter(**{"cfcml.kind": kind}))


def _inputs(run) -> list[tuple[str, str]]:
    return [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs]


def test_smoke_search_tracks_registers_and_resumes(ray_local, men_prepared, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # an apostrophe in the name and in --runs-dir: both land in MLflow filter strings
    runs_dir = tmp_path / "it's runs"
    args = ["--dataset", "men", "--search", "smoke", "--data-root", str(men_prepared.out_dir),
            "--runs-dir", str(runs_dir), "--tracking-uri", uri, "--folds", "2", "--name", "it's mine",
            "--explain-test-patients", "--bought-seeds", "1"]
    assert search_main(args) == 0
    console = capsys.readouterr().out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    assert exp is not None
    (parent,) = _runs(client, exp.experiment_id, "search")
    assert parent.data.tags["cfcml.dataset_fingerprint"] == men_prepared.fingerprint
    assert parent.data.params["seed"] == "0" and parent.data.params["folds"] == "2"
    assert "mlflow.source.git.commit" in parent.data.tags
    assert parent.info.status == "FINISHED"
    # what the MLflow UI shows: a model-training experiment; every run's source and dataset
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    dataset = [("men", men_prepared.fingerprint)]
    assert _inputs(parent) == dataset

    trials = _runs(client, exp.experiment_id, "trial")
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"loss.tau_sam", "loss.w_cp", "loss.momentum"} <= set(run.data.params)
        for key in ("val_macro_auc_fold0", "val_macro_auc_fold1", "cv_macro_auc", "train_loss_fold0"):
            assert key in run.data.metrics, key
        history = client.get_metric_history(run.info.run_id, "cv_macro_auc")
        assert [m.step for m in history] == list(range(1, len(history) + 1))  # one point per epoch
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/roc_oof.png", "plots/confusion_oof.png"} <= arts
        assert _inputs(run) == dataset and run.data.tags["mlflow.source.git.commit"] != "unknown"
        assert run.data.tags["cfcml.scan_backend"] == "chunked"  # what ran: model.scan auto on a CPU worker
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == \
                [m.step for m in history], key  # measured on the trial's worker, every epoch
    # The public code's values are the first point Optuna evaluates.
    assert any(r.data.params["loss.tau_sam"] == "0.07" and r.data.params["loss.w_cp"] == "0.24" for r in trials)

    (final,) = _runs(client, exp.experiment_id, "final")
    for key in ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_macro_auc"):
        assert key in final.data.metrics, key
    m = final.data.metrics
    assert m["test_accuracy_ci_low"] <= m["test_accuracy"] <= m["test_accuracy_ci_high"]
    assert _inputs(final) == dataset and "mlflow.source.git.commit" in final.data.tags
    assert final.data.tags["cfcml.scan_backend"] == "chunked"
    final_epochs = int(final.data.params["final_epochs"])
    for key in ("train_loss", "system/cpu_utilization_percentage", "system/process_memory_rss_megabytes"):
        assert sorted(m.step for m in client.get_metric_history(final.info.run_id, key)) == \
            list(range(1, final_epochs + 1)), key
    # Grad-CAM per test patient (up to 2 per class) and the fields' occlusion, on the final run
    assert "cfcml.explain_error" not in final.data.tags
    explained = {a.path for a in client.list_artifacts(final.info.run_id, "explanations")}
    assert {"explanations/table_fields.png", "explanations/table_fields.csv"} <= explained
    patients = men_prepared.test_frame().groupby("label").head(2)["patient_id"]
    assert {f"explanations/{pid}.png" for pid in patients} <= explained

    # the clinical evidence and the model card on the final run (tuning/evidence/clinical.py,
    # tuning/release/model_card.py)
    clinical = {a.path for a in client.list_artifacts(final.info.run_id, "clinical")}
    assert {f"clinical/{name}" for name in (
        "reliability_oof.png", "reliability_test.png", "decision_curve_test.png", "subgroups_test.csv",
        "missing_inputs_test.png", "missing_inputs_test.csv", "evidence.json", "clinical.md")} <= clinical
    assert "model_card.md" in {a.path for a in client.list_artifacts(final.info.run_id)}
    evidence = json.loads(Path(client.download_artifacts(final.info.run_id, "clinical/evidence.json",
                                                         str(tmp_path))).read_text())
    # temperature and thresholds come from the best trial's out-of-fold predictions, nothing else:
    # fitted again from the trial's own logged out-of-fold file, they are the same
    best_trial = evidence["calibrator"]["source"].split("trial ")[1].split(" ")[0]
    (best_run,) = [r for r in trials if r.data.tags["cfcml.trial_id"] == best_trial]
    oof = pd.read_csv(client.download_artifacts(best_run.info.run_id, "predictions/oof_predictions.csv",
                                                str(tmp_path / "oof")))
    refit = fit_from_oof(oof, list(men_prepared.spec.classes), 0.9, "x")
    assert refit.temperature.t == pytest.approx(evidence["calibrator"]["temperature"], rel=1e-6)
    fitted = [p["threshold"] for p in evidence["calibrator"]["points"]]
    assert [p.threshold for p in refit.points] == pytest.approx(fitted)
    assert final.data.metrics["temperature"] == pytest.approx(refit.temperature.t, rel=1e-6)

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cfcml-men/latest")
    rows = men_prepared.test_frame().drop(columns=["label", "label_name", "split", "fold"])
    probs = model.predict(rows)
    assert list(probs.columns) == list(men_prepared.spec.classes)
    assert probs.shape == (len(rows), 3)
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-5)
    # the only parameters a request may send; none of them chooses the data root
    assert {p.name for p in model.metadata.signature.params.params} == {"raw", "operating_point"}
    raw = model.predict(rows, params={"raw": True})
    np.testing.assert_allclose(probs.to_numpy(), apply_temperature(raw.to_numpy(), refit.temperature.t), atol=1e-6)
    decided = model.predict(rows, params={"operating_point": "Grade_1:youden"})
    assert (decided["decision"] == (decided["Grade_1"] >= decided["threshold"])).all()
    (version,) = client.search_model_versions("name = 'cfcml-men'")
    # the CV figures next to the test ones say how they were chosen
    assert {"selected_cv_macro_auc", "last_epoch_cv_macro_auc", "selected_epoch", "test_accuracy"} <= set(version.tags)
    assert "optimistic" in version.tags["selected_figures"] and "cv_macro_auc" not in version.tags
    assert {"selected_cv_macro_auc", "last_epoch_cv_macro_auc"} <= set(final.data.metrics)
    assert "selected_cv_macro_auc" in parent.data.metrics and not any(k.startswith("best_") for k in
                                                                       parent.data.metrics)
    # the parent's selected figure is the best trial's maximum over its epochs, as its runs show
    best_run = max(trials, key=lambda r: r.data.metrics["selected_cv_macro_auc"])
    assert parent.data.metrics["selected_cv_macro_auc"] == pytest.approx(max(
        m.value for m in client.get_metric_history(best_run.info.run_id, "cv_macro_auc")))
    # logged from code (nothing pickled), with inferred requirements
    local = Path(mlflow.artifacts.download_artifacts("models:/cfcml-men/latest", dst_path=str(tmp_path / "model")))
    assert "model_code_path" in (local / "MLmodel").read_text() and not list(local.rglob("*.pkl"))
    assert "mlflow" in (local / "requirements.txt").read_text()
    assert version.description.startswith("# Model card: `cfcml-men` version 1")
    text = next(runs_dir.rglob("search_report.md")).read_text()
    assert "### Calibration" in text and "### Operating points" in text
    assert "## Model card of the registered model" in text
    # the search's last step: the published defaults against the chosen configuration on a fresh seed
    # (tuning/evidence/bought.py), in the report, the model card, the console and on the parent run
    assert "## What tuning bought" in text and "| macro_auc |" in text and "| brier |" in text
    bought = parent.data.metrics
    for key in ("cfcml_tuned.diff_macro_auc", "cfcml_tuned.diff_balanced_accuracy", "cfcml_tuned.diff_brier"):
        assert key in bought, key
    low, high = (bought.get(f"cfcml_tuned.diff_macro_auc_ci_{end}", float("nan")) for end in ("low", "high"))
    covers_zero = not (low > 0 or high < 0)  # an undefined bound (not logged) measures nothing either
    assert ("Tuning bought nothing measurable on this dataset" in text) == covers_zero
    assert "what tuning bought (cfcml_tuned - cfcml, test, 1 fresh seed(s)): Δmacro_auc" in console
    assert "## What tuning bought" in version.description
    (bought_run,) = _runs(client, exp.experiment_id, "comparison")
    assert bought_run.data.tags["cfcml.bought_of"] == parent.info.run_id and bought_run.info.status == "FINISHED"
    assert bought_run.data.params["variants"] == "cfcml,cfcml_tuned"
    assert (runs_dir / "ray" / "it's mine" / "bought" / "bought.json").is_file()

    # Re-running the finished search with --resume adds no run, no metric point, no model version.
    n_runs = len(client.search_runs([exp.experiment_id]))
    n_points = len(client.get_metric_history(trials[0].info.run_id, "cv_macro_auc"))
    assert search_main(args + ["--resume"]) == 0
    assert len(client.search_runs([exp.experiment_id])) == n_runs
    assert len(client.get_metric_history(trials[0].info.run_id, "cv_macro_auc")) == n_points
    assert len(client.search_model_versions("name = 'cfcml-men'")) == 1  # still just one version
    assert all(_inputs(r) == dataset for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(
        "cfcml.kind") in ("search", "trial", "final"))  # one dataset input each, not one per attempt

    # Without --resume an existing search name is refused rather than overwritten.
    assert search_main(args) == 2

    # The registered model deleted after the search: the final step reads the registry, not its
    # tag, and registers the final run's logged model again (no retraining); predict works again.
    from pipelines.train_final import main as final_main

    client.delete_registered_model("cfcml-men")
    capsys.readouterr()
    assert final_main(["--dataset", "men", "--name", "it's mine", "--runs-dir", str(runs_dir)]) == 0
    assert "gone from the registry (deleted); registering the run's logged model again" in capsys.readouterr().out
    (version,) = client.search_model_versions("name = 'cfcml-men'")
    assert version.run_id == final.info.run_id and version.tags["stage"] == "final"
    probs_again = mlflow.pyfunc.load_model("models:/cfcml-men/latest").predict(rows)
    np.testing.assert_allclose(probs_again.to_numpy(), probs.to_numpy(), rtol=1e-5)
    assert all(r.info.status == "FINISHED" for r in client.search_runs([exp.experiment_id]))
