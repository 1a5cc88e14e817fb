"""Cross-validation folds: stratified by class, grouped by patient, fixed by a seed.

The manifest has one row per patient, so a patient id is its own group and a stratified K-fold over
rows never splits a patient. Rows are sorted by patient id first, so the folds depend only on the
set of patients, their labels and the seed, not on file-system or table order.

`split_problems` is prepare's check that every part a search scores on holds patients: the test
split, and the validation part of every fold (a final model tested on no patient fails only at
the end of a search, with "y_true is empty").
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def assign_folds(patient_id: pd.Series, label: pd.Series, split: pd.Series, folds: int, seed: int) -> pd.Series:
    """Fold index 0..folds-1 for every "dev" row, -1 for "test" rows (never in any fold)."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    from sklearn.model_selection import StratifiedKFold  # scikit-learn only where folds are drawn

    out = pd.Series(-1, index=patient_id.index, dtype="int64")
    dev = split == "dev"
    order = patient_id[dev].astype(str).sort_values(kind="stable").index
    y = label.loc[order].to_numpy()
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(order)), y)):
        out.loc[order[val_idx]] = k
    return out


def split_problems(split: pd.Series, label_name: pd.Series, fold: pd.Series | None, classes: tuple[str, ...],
                   folds: int, ignored_rows: dict[str, int] | None = None
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(refusals, warnings) about the splits of a prepared dataset, each a (code, message) naming
    the split, fold and class.

    split: "dev" | "test" per patient; label_name: its class; fold: its fold (0..folds-1 for dev,
    -1 for test), or None when folds cannot be drawn yet; ignored_rows: rows the label filtering
    (`source.ignored_labels`) dropped per split ("dev", "test"; "": split not known), named in the
    messages about a split or class left empty.

    Refused: no development patient ("empty_dataset"); no test patient ("empty_split": the final
    model could not be tested); a class with no development patient ("empty_class": the model
    cannot learn it) or with fewer than `folds` ("small_class": some fold's validation part would
    lack it); a fold whose validation part is empty ("empty_fold"). Warned ("missing_class"): a
    class with no patient in the test split or in a fold's validation part: its per-class figures
    (sensitivity, one-vs-rest AUC) there are undefined (NaN).
    """
    ignored_rows = ignored_rows or {}

    def filtered(name: str) -> str:
        if ignored_rows.get(name):
            return f" after label filtering (source.ignored_labels dropped {ignored_rows[name]} of its rows)"
        return f" after label filtering (source.ignored_labels dropped {ignored_rows['']} rows)" \
            if ignored_rows.get("") else ""

    problems: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    dev = split == "dev"
    test = split == "test"
    if not dev.any():
        problems.append(("empty_dataset", f"the development split has no patients{filtered('dev')}"))
    if not test.any():
        problems.append(("empty_split", f"the test split has no patients{filtered('test')}: the final model could "
                                        f"not be tested"))
    if not dev.any():
        return problems, warnings
    dev_counts = label_name[dev].value_counts()
    test_counts = label_name[test].value_counts()
    for c in classes:
        n = int(dev_counts.get(c, 0))
        if n == 0:
            problems.append(("empty_class", f"class {c!r} has no patient in the development split{filtered('dev')}: "
                                            f"the model cannot learn it"))
        elif n < folds:
            problems.append(("small_class", f"class {c!r} has {n} development patient(s), fewer than the {folds} "
                                            f"folds"))
        if test.any() and c not in test_counts.index:
            warnings.append(("missing_class", f"class {c!r} has no patient in the test split{filtered('test')}: "
                                              f"its test sensitivity and AUC are undefined"))
    if fold is None:
        return problems, warnings
    for k in range(folds):
        part = label_name[dev & (fold == k)]
        if part.empty:
            problems.append(("empty_fold", f"the validation part of fold {k} has no patients"))
            continue
        for c in classes:
            if dev_counts.get(c, 0) and c not in set(part):
                warnings.append(("missing_class", f"class {c!r} has no patient in the validation part of fold {k}: "
                                                  f"its sensitivity and AUC there are undefined"))
    return problems, warnings
