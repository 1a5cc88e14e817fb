"""compare.py end to end at smoke size: variants x seeds as real Ray trials, the JSON/markdown/plots,
the comparison MLflow run with a child run per variant and seed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.compare import main as compare_main
from tuning.records.outcome import SearchOutcome, TrialResult

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_compare_writes_the_table_json_plots_and_an_mlflow_run(ray_local, men_prepared, tmp_path: Path) -> None:
    # a finished search to take the tuned variant from (its outcome file is all compare reads)
    folder = tmp_path / "runs" / "ray" / "men-smoke"
    folder.mkdir(parents=True)
    SearchOutcome("men", "cv_macro_auc", [TrialResult("t0", params={"loss.w_cp": 0.02}, score=0.8, epoch=1)],
                  str(folder), str(men_prepared.out_dir), "", "", "", ["loss.w_cp"]).save()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "cmp"
    code = compare_main(["--dataset", "men", "--data-root", str(men_prepared.out_dir), "--search", "smoke",
                         "--variants", "cfcml,cfcml_tuned,tabular_only", "--seeds", "1", "--max-epochs", "1",
                         "--folds", "2", "--from-search", "men-smoke", "--runs-dir", str(tmp_path / "runs"),
                         "--tracking-uri", uri, "--out", str(out)])
    assert code == 0

    data = json.loads((out / "comparison.json").read_text())
    assert data["dataset"] == "men" and data["metric"] == "cv_macro_auc"
    assert list(data["variants"]) == ["cfcml", "cfcml_tuned", "tabular_only"]
    for name, v in data["variants"].items():
        for part in ("cv", "test"):
            assert {"macro_auc", "balanced_accuracy", "acc_class_0"} <= set(v[part]), (name, part)
        low, high = v["test_ci"]["macro_auc"]
        assert low <= v["test"]["macro_auc"] <= high
        if name == "cfcml":
            assert "diff_vs_cfcml" not in v
        else:
            d = v["diff_vs_cfcml"]
            assert d["ci_low"] <= d["auc_diff"] <= d["ci_high"]
    assert data["oracle"]["cv"]["macro_auc"] > 0.8  # synthetic data: the generator's latents are known
    assert data["n_test"] == len(men_prepared.test_frame())
    text = (out / "comparison.md").read_text()
    assert "| cfcml_tuned |" in text and "*oracle*" in text
    assert (out / "roc_test.png").stat().st_size > 0 and (out / "metric_bars.png").stat().st_size > 0

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'comparison'")
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "comparison.md", "comparison.json", "roc_test.png", "metric_bars.png"}
    assert run.data.metrics["tabular_only.test_macro_auc"] == pytest.approx(data["variants"]["tabular_only"]["test"]
                                                                            ["macro_auc"], abs=1e-5)
    children = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'comparison-trial'")
    assert sorted(r.info.run_name for r in children) == ["cfcml-0", "cfcml_tuned-0", "tabular_only-0"]
    assert all(r.data.tags["mlflow.parentRunId"] == run.info.run_id for r in children)
