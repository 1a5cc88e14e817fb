"""splits.split_problems: what prepare refuses or warns about the test split and the folds, on
hand-made assignments (prepare's own folds always hold every class, see test_validation.py)."""
from __future__ import annotations

import pandas as pd
import pytest

from cfcml.data.splits import assign_folds, split_problems

CLASSES = ("A", "B")


def assignment(rows: list[tuple[str, str, int]]) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(split, class, fold) per patient."""
    frame = pd.DataFrame(rows, columns=["split", "label", "fold"])
    return frame["split"], frame["label"], frame["fold"]


BALANCED = [("dev", "A", 0), ("dev", "B", 0), ("dev", "A", 1), ("dev", "B", 1), ("test", "A", -1), ("test", "B", -1)]


def test_a_balanced_assignment_has_nothing_to_say() -> None:
    assert split_problems(*assignment(BALANCED), CLASSES, folds=2) == ([], [])


@pytest.mark.parametrize("rows, code, words", [
    ([r for r in BALANCED if r[0] == "dev"], "empty_split", "the test split has no patients"),
    ([r for r in BALANCED if r[0] == "test"], "empty_dataset", "the development split has no patients"),
    ([r for r in BALANCED if r[1] == "A" or r[0] == "test"], "empty_class",
     "class 'B' has no patient in the development split"),
    ([r for r in BALANCED if r != ("dev", "B", 1)], "small_class", "class 'B' has 1 development patient(s), fewer "
                                                                  "than the 2 folds"),
    ([r if r[2] != 1 else (*r[:2], 0) for r in BALANCED], "empty_fold", "the validation part of fold 1 has no "
                                                                         "patients"),
])
def test_an_empty_split_class_or_fold_is_refused_naming_it(rows, code: str, words: str) -> None:
    problems, _ = split_problems(*assignment(rows), CLASSES, folds=2)
    assert (code, words) in [(c, m[:len(words)]) for c, m in problems]


@pytest.mark.parametrize("rows, words", [
    ([r for r in BALANCED if r != ("test", "B", -1)], "class 'B' has no patient in the test split: its test "
                                                      "sensitivity and AUC are undefined"),
    ([("dev", "A", 0), ("dev", "B", 0), ("dev", "A", 1), ("dev", "A", 1), ("dev", "B", 0), ("test", "A", -1),
      ("test", "B", -1)], "class 'B' has no patient in the validation part of fold 1: its sensitivity and AUC there "
                          "are undefined"),
])
def test_a_class_missing_from_the_test_split_or_a_fold_is_a_warning_naming_both(rows, words: str) -> None:
    problems, warnings = split_problems(*assignment(rows), CLASSES, folds=2)
    assert problems == [] and warnings == [("missing_class", words)]


@pytest.mark.parametrize("ignored_rows, words", [
    ({"test": 4, "dev": 2}, " after label filtering (source.ignored_labels dropped 4 of its rows)"),
    ({"": 5}, " after label filtering (source.ignored_labels dropped 5 rows)"),  # split not known when dropped
    ({"dev": 2}, ""),  # the label filtering took nothing from the test split
])
def test_an_empty_split_names_the_rows_label_filtering_dropped_from_it(ignored_rows: dict, words: str) -> None:
    rows = [r for r in BALANCED if r[0] == "dev"]
    problems, _ = split_problems(*assignment(rows), CLASSES, folds=2, ignored_rows=ignored_rows)
    assert problems == [("empty_split", f"the test split has no patients{words}: the final model could not be "
                                        f"tested")]


@pytest.mark.parametrize("per_class", [[3, 3], [3, 7, 4], [5, 3, 3, 9]])
def test_prepares_folds_hold_every_class_once_each_has_as_many_patients_as_folds(per_class: list[int]) -> None:
    classes = tuple("ABCD"[:len(per_class)])
    labels = pd.Series([c for c, n in zip(classes, per_class) for _ in range(n)] + list(classes))
    split = pd.Series(["dev"] * sum(per_class) + ["test"] * len(classes))
    ids = pd.Series([f"P{i:03d}" for i in range(len(labels))])
    for seed in range(5):
        fold = assign_folds(ids, labels, split, 3, seed)
        assert split_problems(split, labels, fold, classes, folds=3) == ([], [])
