"""`compare.py --tune-each N`: every variant's own search space, and the plan of the variants' searches."""
from __future__ import annotations

from pathlib import Path

import pytest

from cfcml.config import FUSION_VARIANTS, ConfigError, read_config
from tuning.evidence import comparison
from tuning.evidence.comparison import (
    COMMON_SPACE,
    FINE_STAGE_KEYS,
    FUSION_SPACES,
    VARIANTS,
    plan_comparison,
    variant_space,
    variant_space_raw,
)
from tuning.hpo.space import search_path

TUNABLE = [v for v in VARIANTS if v != "cfcml_tuned"]


@pytest.mark.parametrize("dataset", ["men", "derm7pt"])
def test_every_variant_has_a_space_that_loads_and_validates_on_its_configuration(tmp_path: Path, dataset) -> None:
    plan = plan_comparison(dataset, tmp_path, search="smoke", runs_dir=tmp_path, tune_each=2)
    assert plan.tuned_variants == TUNABLE  # every variant of the comparison is searched
    for name in TUNABLE:
        space = variant_space(name, plan.variants[name])
        keys = [p.key for p in space]
        assert keys[:3] == list(COMMON_SPACE), name  # lr, weight decay, dropout for every variant
        assert set(FUSION_SPACES.get(name, {})) <= set(keys), name
        trains_fine_stage = plan.variants[name].loss.fine
        assert (set(FINE_STAGE_KEYS) <= set(keys)) == trains_fine_stage, name


def test_the_fine_stage_ranges_are_the_default_search_files(tmp_path: Path) -> None:
    file_space = read_config(search_path("default"))["space"]
    raw = variant_space_raw("cfcml")
    assert {k: raw[k] for k in FINE_STAGE_KEYS} == {k: file_space[k] for k in FINE_STAGE_KEYS}
    assert set(FUSION_SPACES) == set(FUSION_VARIANTS)  # each fusion method searches its own settings too


def test_a_space_value_the_variant_cannot_take_is_refused_naming_the_variant_and_key(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    monkeypatch.setitem(FUSION_SPACES, "film", {"model.fusion.film.hidden": {"dist": "int", "low": 0, "high": 8}})
    with pytest.raises(ConfigError, match=r"variant film: space.model.fusion.film.hidden.low: 0 can be sampled"):
        plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path, variants="film", tune_each=2)


def test_each_variants_search_is_the_comparisons_data_folds_and_budget_without_a_final_model(tmp_path: Path) -> None:
    plan = plan_comparison("men", tmp_path / "data", search="smoke", runs_dir=tmp_path, variants="film", seeds=1,
                           max_epochs=3, fold_seed=4, tune_each=2, name="cmp")
    assert list(plan.variants) == ["cfcml", "film"] and plan.tune_each == 2
    run = plan.variant_search("film")
    assert run.name == "cmp-tune-film" and run.search_dir == tmp_path.resolve() / "ray" / "cmp-tune-film"
    assert run.num_samples == 2 and run.search.num_samples == 2 and run.final is False and run.resume is False
    assert run.experiment == plan.variants["film"]  # same model, epochs, folds, seed as the comparison's film
    assert run.max_epochs == 3 and run.experiment.train.folds == 2 and run.fold_seed == 4
    assert run.data_root == plan.data_root and run.runs_dir == plan.runs_dir
    assert (run.search.grace_period, run.search.reduction_factor) == (1, 2)  # the smoke search's budget
    assert run.search.keys == list(variant_space_raw("film"))
    assert plan.variant_search("film", resume=True).resume is True


def test_tuned_variants_follow_their_untuned_ones_with_the_searched_values(tmp_path: Path) -> None:
    plan = plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path, variants="film,image_only",
                           tune_each=1)
    tuned = plan.with_tuned({"cfcml": {"optim.lr": 1e-4}, "film": {"model.fusion.film.hidden": 16}})
    assert list(tuned.variants) == ["cfcml", "cfcml_tuned", "film", "film_tuned", "image_only"]
    assert tuned.variants["cfcml_tuned"].optim.lr == 1e-4
    assert tuned.variants["film_tuned"].model.fusion.film.hidden == 16
    assert tuned.variants["film_tuned"].model.variant == "film" and tuned.variants["film"] == plan.variants["film"]
    assert plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path).tuned_variants == []


@pytest.mark.parametrize("kwargs,match", [
    ({"tune_each": -1}, r"--tune-each: expected a positive integer"),
    ({"tune_each": 2, "variants": "cfcml_tuned"}, r"--tune-each: not with --from-search or the variant cfcml_tuned"),
    ({"tune_each": 2, "from_search": "men-smoke"}, r"--tune-each: not with --from-search"),
])
def test_bad_tune_each_plans_name_the_flag(tmp_path: Path, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_comparison("men", tmp_path, runs_dir=tmp_path, **kwargs)


def test_cfcml_tuned_has_no_space_of_its_own() -> None:
    with pytest.raises(ConfigError, match="--tune-each: variant 'cfcml_tuned' has no search space"):
        comparison.variant_space_raw("cfcml_tuned")
