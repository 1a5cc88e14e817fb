"""What tuning bought (tuning/evidence/bought.py): the search file's key and its override, the plan of
the closing comparison, the paired differences and the plain sentence when they show nothing."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cfcml.config import ConfigError
from cfcml.evaluation.calibration import brier_score, paired_brier_diff
from cfcml.evaluation.metrics import Estimate
from tuning.evidence.bought import (
    BOUGHT_DIR,
    NOTHING_BOUGHT,
    Bought,
    NoTestPredictions,
    bought_from,
    bought_line,
    bought_lines,
    fresh_seeds,
    plan_bought,
    what_it_bought,
)
from tuning.evidence.comparison import ComparisonResult, aggregate
from tuning.hpo.run import SearchRun
from tuning.hpo.space import SearchConfig, load_search
from tuning.records.outcome import SearchOutcome, TrialResult


def _outcome(run: SearchRun) -> SearchOutcome:
    best = TrialResult("t1", params={"loss.w_cp": 0.011, "loss.tau_sam": 0.3}, score=0.9, epoch=2)
    return SearchOutcome("men", "cv_macro_auc", [TrialResult("t0", score=0.5), best], str(run.search_dir), "p",
                         "sqlite:///unused.db", "1", "r", ["loss.w_cp", "loss.tau_sam"])


def _bought(diff: tuple[float, float, float]) -> Bought:
    return Bought({"macro_auc": Estimate.of(diff), "balanced_accuracy": Estimate(0.0, -0.1, 0.1),
                   "brier": Estimate(-0.01, -0.03, 0.01)},
                  {"cfcml": {"macro_auc": Estimate(0.8, 0.7, 0.9)}, "cfcml_tuned": {"macro_auc": Estimate(0.82)}},
                  (1, 2), 2, 2, 30, "run")


def test_bought_seeds_is_validated_at_load_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bought_seeds"):
        SearchConfig(bought_seeds=-1)
    for value in ("-2", "two", "true"):
        path = tmp_path / "mine.yaml"
        path.write_text(f"num_samples: 1\nbought_seeds: {value}\n")
        with pytest.raises(ConfigError, match="bought_seeds"):
            SearchRun.build("men", str(path), runs_dir=tmp_path)

def test_on_in_the_default_search_off_in_smoke_and_demo_and_overridden_by_the_flag(tmp_path: Path) -> None:
    from cfcml.config import load_experiment

    base = load_experiment("men")
    assert load_search("default", base).bought_seeds == 3
    assert load_search("smoke", base).bought_seeds == 0 and load_search("demo", base).bought_seeds == 0
    assert SearchRun.build("men", "smoke", runs_dir=tmp_path).bought_seeds == 0
    assert SearchRun.build("men", "smoke", runs_dir=tmp_path, bought_seeds=1).bought_seeds == 1
    assert SearchRun.build("men", "default", runs_dir=tmp_path, bought_seeds=0).bought_seeds == 0
    with pytest.raises(ConfigError, match="--bought-seeds"):
        SearchRun.build("men", "smoke", runs_dir=tmp_path, bought_seeds=-1)
    from tuning.search import build_run, parse_args

    args = parse_args(["--dataset", "men", "--search", "smoke", "--runs-dir", str(tmp_path), "--bought-seeds", "2"])
    assert build_run(args).bought_seeds == 2


def test_a_resume_may_change_bought_seeds(tmp_path: Path) -> None:
    on = SearchRun.build("men", "smoke", runs_dir=tmp_path, bought_seeds=2)
    off = SearchRun.build("men", "smoke", runs_dir=tmp_path)
    assert on.settings("f") == off.settings("f")


def test_the_plan_compares_defaults_and_the_winner_on_seeds_the_search_did_not_use(tmp_path: Path) -> None:
    run = SearchRun.build("men", "smoke", runs_dir=tmp_path, bought_seeds=3, seed=7)
    plan = plan_bought(run, _outcome(run))
    assert list(plan.variants) == ["cfcml", "cfcml_tuned"]
    assert plan.variants["cfcml"] == run.experiment  # the published defaults on the search's model and budget
    tuned = plan.variants["cfcml_tuned"]
    assert tuned.loss.w_cp == 0.011 and tuned.loss.tau_sam == 0.3
    assert tuned.replace({"loss.w_cp": run.experiment.loss.w_cp, "loss.tau_sam": run.experiment.loss.tau_sam}) \
        == run.experiment  # only the searched values differ
    assert plan.seeds == (8, 9, 10) and run.experiment.train.seed not in plan.seeds
    assert plan.max_epochs == run.max_epochs  # the search's epoch budget
    assert plan.out_dir == run.search_dir / BOUGHT_DIR and plan.tracking_uri == "sqlite:///unused.db"
    assert fresh_seeds(0, 1) == (1,)
    with pytest.raises(ValueError):
        fresh_seeds(0, 0)


def test_paired_brier_difference_is_the_difference_of_the_scores_with_an_interval_around_it() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    a, b = rng.dirichlet(np.ones(3), 60), rng.dirichlet(np.ones(3), 60)
    d = paired_brier_diff(y, a, b, n_boot=200)
    assert d[0] == pytest.approx(brier_score(y, a) - brier_score(y, b))
    assert d[1] <= d[0] <= d[2]
    assert paired_brier_diff(y, a, a, n_boot=50) == (0.0, 0.0, 0.0)


def test_the_differences_are_tuned_minus_defaults_on_the_same_patients() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 20)
    good = np.eye(3)[y] * 0.7 + 0.1  # the right class most probable for every patient
    noise = rng.dirichlet(np.ones(3), 60)
    trials = [{"variant": "cfcml", "seed": 1, "metrics": {"cv_macro_auc": 0.5}, "test_probs": noise},
              {"variant": "cfcml_tuned", "seed": 1, "metrics": {"cv_macro_auc": 0.9}, "test_probs": good}]
    variants = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml", "cfcml_tuned"], n_boot=100)
    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants, y, None,
                              epochs=2, folds=2, seeds=1, run_id="cmp")
    bought = bought_from(result, (1,), n_boot=200)
    assert list(bought.diffs) == ["macro_auc", "balanced_accuracy", "brier"]
    assert bought.diffs["balanced_accuracy"].point > 0 and bought.diffs["brier"].point < 0
    assert bought.diffs["macro_auc"].low > 0 and not bought.nothing_bought
    assert NOTHING_BOUGHT not in "\n".join(bought_lines(bought))
    m = bought.metrics()
    assert m["cfcml_tuned.diff_macro_auc"] == bought.diffs["macro_auc"].point
    assert m["cfcml_tuned.diff_brier_ci_low"] == bought.diffs["brier"].low
    assert Bought.from_dict(bought.to_dict()) == bought  # no NaN here: equal as they are
    failed = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants[:1], y,
                              None, epochs=2, folds=2, seeds=1, run_id="cmp")
    with pytest.raises(NoTestPredictions, match="cfcml_tuned"):  # every trial of a variant failed
        bought_from(failed, (1,))


def test_a_ci_covering_zero_says_in_plain_words_that_tuning_bought_nothing() -> None:
    covering = _bought((0.004, -0.032, 0.037))
    assert covering.nothing_bought
    text = "\n".join(bought_lines(covering))
    assert "Tuning bought nothing measurable on this dataset" in text and "| macro_auc |" in text
    assert NOTHING_BOUGHT in bought_line(covering)
    assert _bought((math.nan, math.nan, math.nan)).nothing_bought  # no interval: nothing measurable either
    above = _bought((0.048, 0.003, 0.096))
    assert not above.nothing_bought and NOTHING_BOUGHT not in bought_line(above)
    assert "measurably better" in bought_line(above)
    assert "measurably worse" in bought_line(_bought((-0.05, -0.09, -0.01)))


def test_a_finished_step_is_read_back_not_run_again(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = SearchRun.build("men", "smoke", runs_dir=tmp_path, bought_seeds=1)
    done = _bought((0.01, -0.02, 0.03))
    done.save(run.search_dir / BOUGHT_DIR)
    # no Ray, no data, no MLflow: the record alone answers
    assert what_it_bought(run, None, _outcome(run)).to_dict() == done.to_dict()  # type: ignore[arg-type]
    assert "not run again" in capsys.readouterr().out


def test_a_search_that_chose_the_defaults_says_so_and_every_difference_is_zero() -> None:
    y = np.repeat([0, 1, 2], 10)
    probs = np.random.default_rng(2).dirichlet(np.ones(3), 30)
    trials = [{"variant": v, "seed": 1, "metrics": {"cv_macro_auc": 0.7}, "test_probs": probs}
              for v in ("cfcml", "cfcml_tuned")]
    variants = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml", "cfcml_tuned"], n_boot=50)
    variants[1].same_as = "cfcml"  # what the comparison sets when the configurations are equal
    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants, y, None,
                              epochs=2, folds=2, seeds=1, run_id="cmp")
    bought = bought_from(result, (1,), n_boot=100)
    assert bought.chose_defaults and bought.nothing_bought
    assert all((e.point, e.low, e.high) == (0.0, 0.0, 0.0) for e in bought.diffs.values())
    assert "chose the published defaults" in bought_line(bought) and NOTHING_BOUGHT in bought_line(bought)
    assert Bought.from_dict(bought.to_dict()) == bought
    assert not Bought.from_dict({**bought.to_dict(), "chose_defaults": None}).chose_defaults  # older records
