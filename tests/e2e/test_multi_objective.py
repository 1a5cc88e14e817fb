"""A two-objective search end to end on tiny data (real Ray Tune/Train, Optuna, MLflow): Optuna's
study receives both objectives of every trial (each at the trial's selected epoch), the outcome and
the report hold the Pareto front, and the retrained point is the one `FRONT_RULE` picks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.hpo.driver import FRONT_ARTIFACT
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome, nearest_to_ideal, pareto_front
from tuning.search import main as search_main
from tuning.tracking.store import tag_filter

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

OBJECTIVES = ["macro_auc", "balanced_accuracy"]


def test_a_two_objective_search_records_its_front_and_retrains_the_rules_point(ray_local, men_prepared,
                                                                                 tmp_path: Path) -> None:
    from ray.tune.search.optuna import OptunaSearch

    from cfcml.config import CONF_DIR

    (tmp_path / "smoke.yaml").write_text((CONF_DIR / "search" / "smoke.yaml").read_text())  # `extends` reads beside
    search = tmp_path / "two.yaml"
    search.write_text("extends: smoke\nnum_samples: 3\nmax_epochs: 1\nobjectives: [macro_auc, balanced_accuracy]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_dir = tmp_path / "runs"
    assert search_main(["--dataset", "men", "--search", str(search), "--data-root", str(men_prepared.out_dir),
                        "--runs-dir", str(runs_dir), "--tracking-uri", uri, "--folds", "2", "--name", "two",
                        "--no-final"]) == 0

    search_dir = runs_dir / "ray" / "two"
    outcome = SearchOutcome.load(search_dir / OUTCOME_FILE)
    assert outcome.objectives == OBJECTIVES and outcome.metric == "cv_macro_auc"
    assert len(outcome.trials) == 3 and all(t.scored for t in outcome.trials)
    values = {t.trial_id: outcome.objective_values(t) for t in outcome.trials}
    assert all(v is not None and len(v) == 2 for v in values.values())

    # Optuna's study (as Tune saved the searcher) holds both objectives of every trial, as selected
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(search_dir))
    assert [d.name for d in searcher._ot_study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    study = {t.number: t for t in searcher._ot_study.trials}
    assert set(searcher._ot_trials) == set(values)
    for trial_id, ot in searcher._ot_trials.items():
        assert study[ot.number].values == pytest.approx(values[trial_id]), trial_id

    # the front and the rule, recomputed from the trials' values
    ids = list(values)
    points = [values[i] for i in ids]
    front = [ids[i] for i in pareto_front(points, ["max", "max"])]
    assert [t.trial_id for t in outcome.front] == front
    chosen = front[nearest_to_ideal([values[i] for i in front], ["max", "max"])]
    assert outcome.best is not None and outcome.best.trial_id == chosen

    # the report and the parent run hold the front, the chosen point marked
    text = (search_dir / "search_report.md").read_text()
    assert "## Pareto front" in text and (search_dir / "report" / "pareto_front.png").is_file()
    assert f"| {chosen} | " in text and f"Trial `{chosen}`" in text
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    assert exp is not None
    (parent,) = client.search_runs([exp.experiment_id], filter_string=tag_filter(**{"cfcml.kind": "search"}))
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, FRONT_ARTIFACT, str(tmp_path))).read_text())
    assert logged["objectives"] == OBJECTIVES and [p["trial_id"] for p in logged["front"]] == front
    assert [p["trial_id"] for p in logged["front"] if p["chosen"]] == [chosen]
    assert parent.data.tags["cfcml.best_trial"] == chosen and "cfcml.front_rule" in parent.data.tags
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/pareto_front.png" in arts
