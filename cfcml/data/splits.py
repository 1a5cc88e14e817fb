"""Cross-validation folds: stratified by class, grouped by patient, fixed by a seed.

The manifest has one row per patient, so a patient id is its own group and a stratified K-fold over
rows never splits a patient. Rows are sorted by patient id first, so the folds depend only on the
set of patients, their labels and the seed, not on file-system or table order.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold


def assign_folds(patient_id: pd.Series, label: pd.Series, split: pd.Series, folds: int, seed: int) -> pd.Series:
    """Fold index 0..folds-1 for every "dev" row, -1 for "test" rows (never in any fold)."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    out = pd.Series(-1, index=patient_id.index, dtype="int64")
    dev = split == "dev"
    order = patient_id[dev].astype(str).sort_values(kind="stable").index
    y = label.loc[order].to_numpy()
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(order)), y)):
        out.loc[order[val_idx]] = k
    return out
