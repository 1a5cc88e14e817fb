"""The outer folds of nested cross-validation (`search.py --outer-folds K`) and the dataset each
outer search sees.

`outer_split` splits the development patients (never the test split, which it does not read) into
K outer folds, grouped by patient and stratified by class with scikit-learn's
`StratifiedGroupKFold`, shuffled with the prepared dataset's fold seed, over rows sorted by patient
id: the same patients, labels and seed give the same folds.

`outer_view` writes the prepared dataset outer fold k's search trains on, a folder of its own
holding only a manifest (the images stay in the base dataset's cache, named by an absolute
`cache_dir`): the outer-training patients are its development split, with their own inner folds
drawn as prepare draws them (`cfcml.data.splits.assign_folds`, the base dataset's fold count is the
caller's and its fold seed); the outer-held-out patients are its "test" split, which the search never
reads (`PreparedDataset.test_frame` only), and which the outer fold's retrained winner is scored on
once. The base dataset's test rows are not in it. Every normaliser, class weight and inner fold of the
outer search is therefore fitted on outer-training patients only (`cfcml.training.cv_splits`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cfcml.config import ConfigError
from cfcml.data.manifest import MANIFEST_FILE, PreparedDataset, write_manifest

OUTER_KEY = "outer"  # the view's prepare record: {fold, folds, seed, base, base_fingerprint}


def outer_split(prepared: PreparedDataset, folds: int) -> pd.Series:
    """The outer fold (0..folds-1) of every development patient.

    Args:
        prepared: the search's prepared dataset; only its development rows are read.
        folds: K, the number of outer folds (>= 2).

    Returns:
        Outer fold per patient, indexed by patient id (str), sorted by patient id; test patients
        are not in it.

    Raises:
        ConfigError: `folds` below 2, or a class with fewer development patients than `folds`
            (some outer-held-out part would lack it).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise ConfigError(f"--outer-folds: expected at least 2 outer folds, got {folds}")
    dev = prepared.dev_frame().sort_values("patient_id", kind="stable").reset_index(drop=True)
    counts = dev["label_name"].value_counts()
    small = {c: int(counts.get(c, 0)) for c in prepared.spec.classes if counts.get(c, 0) < folds}
    if small:
        raise ConfigError(f"--outer-folds {folds}: class(es) {small} have fewer development patients than outer "
                          f"folds; use fewer outer folds")
    out = pd.Series(-1, index=dev["patient_id"].astype(str), dtype="int64", name="outer_fold")
    skf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=prepared.fold_seed)
    for k, (_, held) in enumerate(skf.split(np.zeros(len(dev)), dev["label"].to_numpy(),
                                            groups=dev["patient_id"].astype(str).to_numpy())):
        out.iloc[held] = k
    return out


def view_manifest(prepared: PreparedDataset, outer: pd.Series, k: int, inner_folds: int) -> pd.DataFrame:
    """The manifest outer fold `k`'s search sees: outer-training rows as "dev" with inner folds
    0..inner_folds-1 (drawn with the base fold seed), outer-held-out rows as "test" (fold -1); no
    base test row.

    Raises:
        ConfigError: an inner fold or the held-out part would lack a class or be empty
            (`cfcml.data.splits.split_problems`), naming --outer-folds and --folds.
    """
    from cfcml.data.splits import assign_folds, split_problems

    dev = prepared.dev_frame()
    held = dev["patient_id"].astype(str).map(outer).to_numpy() == k
    frame = dev.copy()
    frame["split"] = np.where(held, "test", "dev")
    for folds in (None, True):  # the classes first (folds cannot be drawn otherwise), then each inner fold
        if folds:
            frame["fold"] = assign_folds(frame["patient_id"], frame["label"], frame["split"], inner_folds,
                                         prepared.fold_seed).to_numpy()
        problems, _ = split_problems(frame["split"], frame["label_name"], frame["fold"] if folds else None,
                                     prepared.spec.classes, inner_folds)
        if problems:
            raise ConfigError(f"--outer-folds: outer fold {k}: {problems[0][1]} (outer-training patients as "
                              f"development, outer-held-out as test); use fewer outer or inner folds (--folds)")
    order = frame.assign(_test=frame["split"] == "test").sort_values(["_test", "patient_id"]).index
    return frame.loc[order].reset_index(drop=True)


def outer_view(prepared: PreparedDataset, outer: pd.Series, k: int, inner_folds: int, out_dir: Path) -> PreparedDataset:
    """Write (or reuse, when it holds the same rows) outer fold `k`'s prepared dataset in `out_dir`.

    Args:
        prepared: the base prepared dataset (its cache is shared, not copied).
        outer: `outer_split(prepared, K)`.
        k: the outer fold, 0-based.
        inner_folds: the inner folds of the outer search (`train.folds`).
        out_dir: the view's folder (a manifest and prepare.json only).

    Returns:
        The view. Its fingerprint hashes its own manifest and the base dataset's fingerprint.
    """
    manifest = view_manifest(prepared, outer, k, inner_folds)
    digest = hashlib.sha256(manifest.to_csv(index=False).encode())
    digest.update(prepared.fingerprint.encode())
    info = dict(prepared.info)
    split = manifest["split"]
    info.update({
        "cache_dir": str(prepared.cache_dir.resolve()),
        "folds": inner_folds,
        "fingerprint": digest.hexdigest()[:16],
        "counts": {"split": {s: _per_class(g, prepared) for s, g in manifest.groupby("split")},
                   "fold": {int(f): _per_class(g, prepared) for f, g in manifest[split == "dev"].groupby("fold")}},
        OUTER_KEY: {"fold": k, "folds": int(outer.max()) + 1, "seed": prepared.fold_seed,
                    "base": str(prepared.out_dir), "base_fingerprint": prepared.fingerprint},
    })
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).is_file():
        existing = PreparedDataset.load(out_dir)
        if existing.fingerprint == info["fingerprint"]:
            return existing
    write_manifest(manifest, out_dir, json.loads(json.dumps(info, default=str)))
    return PreparedDataset.load(out_dir)


def _per_class(frame: pd.DataFrame, prepared: PreparedDataset) -> dict[str, int]:
    counts = frame["label_name"].value_counts()
    return {c: int(counts.get(c, 0)) for c in prepared.spec.classes}
