"""A search on a busy machine, as a hospital names things: more CPU-bound processes than cores run
beside it the whole time, its folders and name carry accents, and the process locale is C.

- Under load: the placement-group janitor of 2026-11-30 took live trials' CPUs and `make demo` hung
  2 times in 2 (docs/architecture.md, "Edges"). The search finishes, the watchdog's default never
  fires, and every MLflow run ends FINISHED.
- Beyond ASCII: `--runs-dir`, `--data-root` and `--name` with accents, no UTF-8 locale and
  PYTHONIOENCODING unset. It failed after every trial had run: Ray Train tags its metrics with the
  run's name and Ray encodes tags as ASCII (`tuning.hpo.trainer.ray_train_name`); the final model's
  run was the one that failed, so the search goes through its final model.

- Two objectives (`objectives: [macro_auc, balanced_accuracy]`): Optuna's study receives both
  objectives of every trial (each at the trial's selected epoch), the outcome, the report and the
  parent run hold the Pareto front, and the final model is trained from the point `FRONT_RULE` picks.

One search proves all three (each alone cost a search's start-up: the suite's time, issue 26).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cfcml.config import CONF_DIR, PROJECT_ROOT
from tuning.hpo.driver import FRONT_ARTIFACT
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome, nearest_to_ideal, pareto_front

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture
def cpu_hogs():
    """One busy-looping process per core, plus one."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 2) + 1)]
    try:
        yield len(hogs)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


OBJECTIVES = ["macro_auc", "balanced_accuracy"]


def test_a_two_objective_search_in_accented_folders_under_the_c_locale_beside_more_busy_processes_than_cores(
        men_prepared, tmp_path: Path, cpu_hogs: int) -> None:
    data = shutil.copytree(men_prepared.out_dir, tmp_path / "Klinik Düsseldorf" / "präpariert")
    (data.parent / "smoke.yaml").write_text((CONF_DIR / "search" / "smoke.yaml").read_text())  # `extends` reads beside
    search = data.parent / "zwei Ziele.yaml"
    search.write_text(f"extends: smoke\nobjectives: [{', '.join(OBJECTIVES)}]\n")
    runs, name = tmp_path / "rüns", "süche-Ñúñez"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(LANG="C", LC_ALL="C", PYTHONPATH=str(PROJECT_ROOT))
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "tuning/search.py", "--dataset", "men", "--search", str(search),
                          "--data-root", str(data), "--runs-dir", str(runs), "--name", name, "--folds", "2",
                          "--image-size", "32", "32", "8", "--num-samples", "2", "--max-epochs", "1"],
                         cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, encoding="utf-8", timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stalled" not in out.stdout  # the watchdog's generous default never fired
    assert "=== final model" in out.stdout and (runs / "ray" / name / "outcome.json").is_file()

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cfcml-men")
    runs_found = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("cfcml.kind") for r in runs_found) == ["final", "search", "trial", "trial"]
    assert {r.info.status for r in runs_found} == {"FINISHED"}  # none left RUNNING
    (final,) = [r for r in runs_found if r.data.tags["cfcml.kind"] == "final"]
    assert "test_macro_auc" in final.data.metrics
    (parent,) = [r for r in runs_found if r.data.tags["cfcml.kind"] == "search"]
    assert parent.info.run_name == name
    assert client.list_artifacts(parent.info.run_id)  # artifacts under the accented runs folder

    # the front: Optuna's study (as Tune saved the searcher) holds both objectives of every trial
    from ray.tune.search.optuna import OptunaSearch

    search_dir = runs / "ray" / name
    outcome = SearchOutcome.load(search_dir / OUTCOME_FILE)
    assert outcome.objectives == OBJECTIVES and outcome.metric == "cv_macro_auc"
    assert len(outcome.trials) == 2 and all(t.scored for t in outcome.trials)
    values = {t.trial_id: outcome.objective_values(t) for t in outcome.trials}
    assert all(v is not None and len(v) == 2 for v in values.values())
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(search_dir))
    assert [d.name for d in searcher._ot_study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    study = {t.number: t for t in searcher._ot_study.trials}
    assert set(searcher._ot_trials) == set(values)
    for trial_id, ot in searcher._ot_trials.items():
        assert study[ot.number].values == pytest.approx(values[trial_id]), trial_id
    # the front and the rule, recomputed from the trials' values; the final model is the chosen point's
    ids = list(values)
    front = [ids[i] for i in pareto_front([values[i] for i in ids], ["max", "max"])]
    assert [t.trial_id for t in outcome.front] == front
    chosen = front[nearest_to_ideal([values[i] for i in front], ["max", "max"])]
    assert outcome.best is not None and outcome.best.trial_id == chosen
    text = (search_dir / "search_report.md").read_text(encoding="utf-8")
    assert "## Pareto front" in text and (search_dir / "report" / "pareto_front.png").is_file()
    assert f"| {chosen} | " in text and f"Trial `{chosen}`" in text
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, FRONT_ARTIFACT, str(tmp_path))).read_text())
    assert logged["objectives"] == OBJECTIVES and [p["trial_id"] for p in logged["front"]] == front
    assert [p["trial_id"] for p in logged["front"] if p["chosen"]] == [chosen]
    assert parent.data.tags["cfcml.best_trial"] == chosen and "cfcml.front_rule" in parent.data.tags
    (version,) = client.search_model_versions("name = 'cfcml-men'")
    assert version.tags["best_trial"] == chosen and version.run_id == final.info.run_id
