"""A multi-objective search's Pareto front and the one rule that picks its retrained point: the
non-dominated trials on the objectives' CV values at each trial's selected epoch, then the front
point nearest the ideal after scaling each objective over the front. A search on one objective
keeps choosing its highest score."""
from __future__ import annotations

import math

import pytest

from tuning.records.outcome import (
    EpochSelection,
    SearchOutcome,
    TrialResult,
    dominates,
    nearest_to_ideal,
    pareto_front,
)


@pytest.mark.parametrize("a, b, modes, expected", [
    ((0.9, 0.7), (0.8, 0.7), ("max", "max"), True),  # better on one, equal on the other
    ((0.9, 0.7), (0.9, 0.7), ("max", "max"), False),  # equal points dominate neither way
    ((0.9, 0.6), (0.8, 0.7), ("max", "max"), False),  # a trade-off
    ((0.9, 0.10), (0.8, 0.20), ("max", "min"), True),  # a lower Brier score is better
    ((0.9, 0.30), (0.8, 0.20), ("max", "min"), False),
])
def test_a_point_dominates_when_as_good_on_every_objective_and_better_on_one(a, b, modes, expected) -> None:
    assert dominates(a, b, modes) is expected


@pytest.mark.parametrize("points, modes, front", [
    ([(0.9, 0.5), (0.8, 0.7), (0.7, 0.6), (0.6, 0.4)], ("max", "max"), [0, 1]),  # two dominated points
    ([(0.9, 0.5), (0.9, 0.5), (0.8, 0.4)], ("max", "max"), [0, 1]),  # ties: both equal points stay
    ([(0.9, 0.30), (0.8, 0.10), (0.85, 0.20), (0.8, 0.25)], ("max", "min"), [0, 1, 2]),  # max and min mixed
    ([(0.9, 0.30), (0.8, 0.10), (0.85, 0.20), (0.8, 0.25)], ("min", "max"), [0, 3]),  # the same, directions swapped
    ([(0.5, 0.5)], ("max", "max"), [0]),
    ([(0.9, 0.5, 0.2), (0.9, 0.5, 0.1), (0.8, 0.9, 0.3)], ("max", "max", "min"), [1, 2]),  # three objectives
])
def test_the_front_holds_the_points_no_other_point_dominates(points, modes, front) -> None:
    assert pareto_front(points, modes) == front


@pytest.mark.parametrize("points, modes, chosen", [
    ([(0.95, 0.50), (0.90, 0.80), (0.70, 0.85)], ("max", "max"), 1),  # the balanced point, not the best AUC
    ([(0.95, 0.50), (0.70, 0.85)], ("max", "max"), 0),  # equally far from the ideal: the better primary
    ([(0.90, 0.30), (0.88, 0.12), (0.80, 0.10)], ("max", "min"), 1),  # a minimised objective scaled the other way
    ([(0.90, 0.6), (0.90, 0.6)], ("max", "max"), 0),  # identical points: the first trial
    ([(0.80, 0.6)], ("max", "max"), 0),  # a front of one
])
def test_the_rule_picks_the_front_point_nearest_the_ideal(points, modes, chosen) -> None:
    assert nearest_to_ideal(points, modes) == chosen


def test_the_rule_needs_a_point() -> None:
    with pytest.raises(ValueError, match="at least one point"):
        nearest_to_ideal([], ("max", "max"))


def _trial(trial_id: str, auc: float, bal: float, brier: float = 0.2) -> TrialResult:
    return TrialResult(trial_id, score=auc, epoch=2, epochs_run=2,
                       metrics={"cv_macro_auc": auc, "cv_balanced_accuracy": bal, "cv_brier": brier})


def _outcome(trials: list[TrialResult], objectives: list[str]) -> SearchOutcome:
    return SearchOutcome("men", "cv_macro_auc", trials, "s", "p", "u", "1", "r", [], objectives)


def test_a_multi_objective_outcome_retrains_the_point_the_rule_picks_from_its_front() -> None:
    trials = [_trial("a", 0.95, 0.50), _trial("b", 0.90, 0.80), _trial("c", 0.70, 0.85), _trial("d", 0.85, 0.70),
              TrialResult("e", error="worker died"), _trial("f", 0.99, math.nan)]  # f: no balanced accuracy
    out = _outcome(trials, ["macro_auc", "balanced_accuracy"])
    assert [t.trial_id for t in out.front] == ["a", "b", "c"]  # d is dominated by b; e and f have no values
    assert out.best is not None and out.best.trial_id == "b"
    assert out.modes == ["max", "max"] and out.objective_values(out.best) == [0.90, 0.80]
    # a single-objective search (or one objective) keeps the highest score: the AUC-only winner
    for objectives in ([], ["macro_auc"]):
        single = _outcome(trials, objectives)
        assert single.front == [] and single.best is not None and single.best.trial_id == "f"


def test_a_minimised_objective_is_scaled_the_other_way() -> None:
    trials = [_trial("a", 0.90, 0.6, brier=0.30), _trial("b", 0.88, 0.6, brier=0.12), _trial("c", 0.80, 0.6, 0.10)]
    out = _outcome(trials, ["macro_auc", "brier"])
    assert out.modes == ["max", "min"] and [t.trial_id for t in out.front] == ["a", "b", "c"]
    assert out.best is not None and out.best.trial_id == "b"


def test_an_outcome_keeps_its_objectives_through_its_file(tmp_path) -> None:
    out = _outcome([_trial("a", 0.9, 0.5), _trial("b", 0.8, 0.7)], ["macro_auc", "balanced_accuracy"])
    again = SearchOutcome.load(out.save(tmp_path / "outcome.json"))
    assert again.objectives == ["macro_auc", "balanced_accuracy"] and [t.trial_id for t in again.front] == ["a", "b"]


def test_the_other_objectives_are_reported_at_the_selected_epoch() -> None:
    selection = EpochSelection("cv_macro_auc", also=("cv_balanced_accuracy",))
    reports = [selection.update({"epoch": e, "cv_macro_auc": auc, "cv_balanced_accuracy": bal})
               for e, auc, bal in [(1, 0.7, 0.9), (2, 0.8, 0.4), (3, 0.75, 0.95)]]
    # the primary picks the epoch (2); the other objective is its value there, not its own maximum
    assert [r["selected_cv_balanced_accuracy"] for r in reports] == [0.9, 0.4, 0.4]
    assert reports[-1]["selected_epoch"] == 2
    # a restart from epoch 1's checkpoint retrains epoch 2: the discarded epoch's value goes with it
    restarted = selection.update({"epoch": 2, "cv_macro_auc": 0.6, "cv_balanced_accuracy": 0.3})
    assert (restarted["selected_epoch"], restarted["selected_cv_balanced_accuracy"]) == (1, 0.9)
    # a worker restored from a checkpoint continues from the values it was reported with
    restored = EpochSelection("cv_macro_auc", also=("cv_balanced_accuracy",))
    restored.restore(reports[-1])
    assert restored.fields()["selected_cv_balanced_accuracy"] == 0.4
    assert restored.update({"epoch": 3, "cv_macro_auc": 0.5, "cv_balanced_accuracy": 1.0})[
        "selected_cv_balanced_accuracy"] == 0.4
    # without `also` the fields are exactly as before
    assert set(EpochSelection("cv_macro_auc").update({"epoch": 1, "cv_macro_auc": 0.7})) == {
        "selected_cv_macro_auc", "selected_epoch"}
