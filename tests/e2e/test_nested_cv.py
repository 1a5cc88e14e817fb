"""Nested cross-validation end to end (`search.py --outer-folds 2`, real Ray Tune/Train, Optuna and
MLflow, one trial of one epoch per search): the estimate lands in the report, on the parent run and
in the console summary; and it never reads the test split: the outer searches, their winners and
every nested figure are the same on a copy whose test rows have other labels, values and images."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cfcml.evaluation import metric_keys
from tuning.search import build_run, parse_args
from tuning.search import main as search_main
from tuning.tracking.store import tag_filter
from tuning.workflows.nested import HELDOUT_FILE, NESTED_FILE, outer_name, run_nested

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _args(data: Path, runs: Path, uri: str) -> list[str]:
    return ["--dataset", "men", "--search", "smoke", "--data-root", str(data), "--runs-dir", str(runs),
            "--tracking-uri", uri, "--folds", "2", "--num-samples", "1", "--max-epochs", "1",
            "--outer-folds", "2", "--no-final", "--name", "nested"]


def test_nested_search_reports_an_estimate_that_never_reads_the_test_split(ray_local, men_prepared, altered_copy,
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    assert search_main(_args(men_prepared.out_dir, runs, uri)) == 0
    assert "nested CV (2 outer folds, outer-held-out)" in capsys.readouterr().out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    assert exp is not None
    (parent,) = client.search_runs([exp.experiment_id], filter_string=tag_filter(
        **{"cfcml.search": str(runs.resolve() / "ray" / "nested"), "cfcml.kind": "search"}))
    key = metric_keys.nested("macro_auc")
    m = parent.data.metrics
    for k in (key, metric_keys.ci_low(key), metric_keys.fold(key, 0), metric_keys.nested("balanced_accuracy")):
        assert k in m, k
    assert m[key] == pytest.approx((m[metric_keys.fold(key, 0)] + m[metric_keys.fold(key, 1)]) / 2)
    assert {"nested_cv.md", "nested_cv.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    outers = client.search_runs([exp.experiment_id], filter_string=tag_filter(
        **{"cfcml.nested_of": parent.info.run_id, "cfcml.kind": "search"}))
    assert sorted(r.data.tags["cfcml.outer_fold"] for r in outers) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in outers)
    report = (runs / "ray" / "nested" / "search_report.md").read_text(encoding="utf-8")
    assert "## Nested cross-validation (2 outer folds)" in report and "ordinary search, selected" in report

    # The same nested step on a copy whose test rows differ: every figure, choice and prediction is the same.
    other = altered_copy(men_prepared, tmp_path / "other", lambda x: x["split"] == "test")
    run = build_run(parse_args(_args(other.out_dir, tmp_path / "runs2", f"sqlite:///{tmp_path / 'other.db'}")))
    nested = run_nested(run, other, n_boot=1000)
    assert {k: v for k, v in nested.metrics().items() if k in m} == {k: v for k, v in m.items()
                                                                   if metric_keys.is_kind(k, metric_keys.NESTED)}
    for k in range(2):
        first = json.loads((runs / "ray" / outer_name(run, k) / NESTED_FILE).read_text(encoding="utf-8"))
        again = nested.folds[k].to_dict()
        for record in (first, again):
            record.pop("trial_id")  # Tune's id, not a figure
        assert first == again
        pd.testing.assert_frame_equal(pd.read_csv(runs / "ray" / outer_name(run, k) / HELDOUT_FILE),
                                      pd.read_csv(tmp_path / "runs2" / "ray" / outer_name(run, k) / HELDOUT_FILE))
