"""`tune_variants` (compare.py --tune-each) reuses a variant's finished search rather than rerunning it, and
refuses one started with other settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from cfcml.config import ConfigError
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.evidence.comparison import plan_comparison
from tuning.hpo.driver import SearchState
from tuning.records.outcome import SearchOutcome, TrialResult
from tuning.workflows.compare import tune_variants


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("tune") / "men", patients=40, seed=0, size=(8, 8, 4))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(8, 8, 4))


def _finished(plan, variant: str, prepared, params: dict, settings: dict | None = None) -> None:
    """A finished search of `variant` as the driver leaves it: its state file and outcome.json."""
    run = plan.variant_search(variant)
    SearchState("run", "sqlite:///x.db", "1", settings or run.settings(prepared.fingerprint)).save(run.search_dir)
    SearchOutcome("men", "cv_macro_auc", [TrialResult("t0", params=params, score=0.7, epoch=1)],
                  str(run.search_dir), str(prepared.out_dir), "", "", "", list(params)).save()


def test_finished_variant_searches_are_reused_not_rerun(tmp_path: Path, prepared) -> None:
    plan = plan_comparison("men", prepared.out_dir, search="smoke", runs_dir=tmp_path, variants="film",
                           tune_each=2, name="cmp", image_size=[8, 8, 4])
    _finished(plan, "cfcml", prepared, {"optim.lr": 3e-4})
    _finished(plan, "film", prepared, {"model.fusion.film.hidden": 16})
    tuned = tune_variants(plan, prepared)  # no Ray running: nothing may start
    assert list(tuned.variants) == ["cfcml", "cfcml_tuned", "film", "film_tuned"]
    assert tuned.variants["cfcml_tuned"].optim.lr == 3e-4
    assert tuned.variants["film_tuned"].model.fusion.film.hidden == 16


def test_a_variant_search_started_with_other_settings_is_refused_naming_them(tmp_path: Path, prepared) -> None:
    plan = plan_comparison("men", prepared.out_dir, search="smoke", runs_dir=tmp_path, variants="cfcml",
                           tune_each=2, name="cmp", image_size=[8, 8, 4])
    settings = {**plan.variant_search("cfcml").settings(prepared.fingerprint), "num_samples": 5}
    _finished(plan, "cfcml", prepared, {"optim.lr": 3e-4}, settings)
    with pytest.raises(ConfigError, match=r"--tune-each: the search of variant cfcml at .* was started with other "
                                          r"settings \(num_samples: 5 recorded, 2 now\)"):
        tune_variants(plan, prepared)
