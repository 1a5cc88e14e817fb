"""compare.py end to end at smoke size: a search per variant (`--tune-each`), then variants x seeds as
real Ray trials, the JSON/markdown/plots, the comparison MLflow run with a child run per variant and seed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.compare import main as compare_main
from tuning.records.outcome import SearchOutcome

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_compare_tunes_each_variant_on_development_folds_then_writes_the_table_json_plots_and_an_mlflow_run(
        ray_local, men_prepared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--tune-each 2` over CFCML and FiLM: a search per variant, both at once (one trial slot each of
    the 2-CPU Ray's two, each search in a process of its own), then every variant trained at its
    defaults and at its search's best values on the shared seed, once per configuration.
    (`--from-search`, the other way to a tuned row, differs only in where the values come from:
    tests/tuning/evidence/test_comparison.py. One comparison here holds both tests' start-up cost
    once: the suite's time, issue 26.)"""
    runs, uri, out = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "cmp"
    code = compare_main(["--dataset", "men", "--data-root", str(men_prepared.out_dir), "--search", "smoke",
                         "--variants", "cfcml,film", "--tune-each", "2", "--seeds", "1", "--max-epochs", "1",
                         "--folds", "2", "--name", "tiny", "--runs-dir", str(runs), "--tracking-uri", uri,
                         "--out", str(out)])
    assert code == 0
    console = capsys.readouterr().out
    assert "the searches of 2 variants, 2 at once (2 trial slots shared out)" in console
    for variant in ("cfcml", "film"):  # each search's lines under its variant's label
        assert f"[{variant}] variant {variant}: running its search 'tiny-tune-{variant}' (2 trials" in console
        assert f"[{variant}] trial " in console

    data = json.loads((out / "comparison.json").read_text())
    assert data["dataset"] == "men" and data["metric"] == "cv_macro_auc" and data["tune_each"] == 2
    assert list(data["variants"]) == ["cfcml", "cfcml_tuned", "film", "film_tuned"]  # tuned beside untuned
    for name, v in data["variants"].items():
        assert v["seeds"] == 1
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
    assert "| film_tuned |" in text and "| cfcml_tuned |" in text and "*oracle*" in text
    assert (out / "roc_test.png").stat().st_size > 0 and (out / "metric_bars.png").stat().st_size > 0

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    for variant in ("cfcml", "film"):
        folder = runs / "ray" / f"tiny-tune-{variant}"
        outcome = SearchOutcome.load(folder / "outcome.json")
        assert len(outcome.trials) == 2 and outcome.best is not None, variant
        recorded = _keys(json.loads((folder / "outcome.json").read_text()))
        assert not [k for k in recorded if k.startswith("test_")], variant  # development folds only
        assert outcome.prepared_dir == str(men_prepared.out_dir)  # the comparison's data and folds
        (search,) = client.search_runs([exp.experiment_id], filter_string=(
            f"tags.`cfcml.kind` = 'search' and attributes.run_name = 'tiny-tune-{variant}'"))
        assert search.info.status == "FINISHED"
        trials = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                                                       f"'{search.info.run_id}'")
        assert len([r for r in trials if r.data.tags["cfcml.kind"] == "trial"]) == 2, variant
        assert not any(k.startswith("test_") for r in trials for k in r.data.metrics), variant

    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'comparison'")
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "comparison.md", "comparison.json", "roc_test.png", "metric_bars.png"}
    assert run.data.metrics["film_tuned.test_macro_auc"] == pytest.approx(data["variants"]["film_tuned"]["test"]
                                                                          ["macro_auc"], abs=1e-5)
    children = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'comparison-trial'")
    # a tuned variant whose search chose its defaults is those models, not trained again
    same = {name: v["same_as"] for name, v in data["variants"].items() if v["same_as"]}
    assert set(same) <= {"cfcml_tuned", "film_tuned"} and all(same[n] == n.removesuffix("_tuned") for n in same)
    for later, earlier in same.items():
        assert data["variants"][later]["test"] == data["variants"][earlier]["test"]
        assert data["variants"][later]["diff_vs_cfcml"] == data["variants"][earlier].get(
            "diff_vs_cfcml", {"auc_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0})
    assert sorted(r.info.run_name for r in children) == sorted(f"{n}-0" for n in data["variants"] if n not in same)
    assert all(r.data.tags["mlflow.parentRunId"] == run.info.run_id for r in children)


def _keys(data: object) -> set[str]:
    """Every mapping key anywhere in a JSON document."""
    if isinstance(data, dict):
        return set(data).union(*(_keys(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_keys(v) for v in data))
    return set()
