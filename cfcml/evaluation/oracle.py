"""The oracle of a synthetic dataset: how well the generator's own latent signals predict the class.

A synthetic dataset written by `cfcml.data.synthetic` keeps the noisy latent signals it drew the
images and the table from in `_synthetic_latents.csv`, beside the raw layout. A logistic
regression on those signals (and their pairwise products, so that an interaction of image and
table is reachable) is the reference a model can hope to approach: it sees exactly the
information the generator put in, without having to read it off pixels.

Reports and comparisons read it; training and model selection never do. It uses the same folds as
the models (fit on each training fold, scored on its validation fold) and, for the test figure,
is fit on all development rows and scored once on the test rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cfcml.data.manifest import PreparedDataset
from cfcml.data.synthetic import LATENTS_FILE
from cfcml.evaluation.metrics import bootstrap_ci, compute_metrics


@dataclass
class OracleScores:
    features: list[str]  # the latent signals (and products) it was given
    cv: dict[str, float]  # mean over validation folds, like a trial's cv_* metrics
    test: dict[str, tuple[float, float, float]]  # (point, low, high) per metric on the test split
    test_probs: np.ndarray  # [N_test, C], in test_frame() order


def _design(latents: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    signals = [c for c in latents.columns if c.endswith("_signal")]
    x = latents[signals].to_numpy(float)
    names = list(signals)
    for i, j in combinations(range(len(signals)), 2):
        x = np.column_stack([x, x[:, i] * x[:, j]])
        names.append(f"{signals[i]}*{signals[j]}")
    return x, names


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, num_classes: int) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)  # a class absent from a training fold gets 0
    return probs


def oracle_scores(prepared: PreparedDataset, n_boot: int = 1000) -> OracleScores | None:
    """The oracle's CV and test metrics, or None when the dataset has no generator latents."""
    path = prepared.root / LATENTS_FILE
    if not path.is_file():
        return None
    latents = pd.read_csv(path)
    ids = latents.iloc[:, 0].astype(str)  # patient_id (MEN) or case_num (Derm7pt)
    x_all, names = _design(latents)
    rows = dict(zip(ids, range(len(ids))))
    spec = prepared.spec
    C = len(spec.classes)

    def features(frame: pd.DataFrame) -> np.ndarray:
        return x_all[[rows[str(p)] for p in frame["patient_id"]]]

    per_fold = []
    for k in range(prepared.folds):
        train, val = prepared.fold_frames(k)
        probs = _fit_predict(features(train), train["label"].to_numpy(), features(val), C)
        per_fold.append(compute_metrics(spec.task, val["label"].to_numpy(), probs))
    cv = {key: float(np.nanmean([m[key] for m in per_fold])) for key in per_fold[0]}
    dev, test = prepared.dev_frame(), prepared.test_frame()
    test_probs = _fit_predict(features(dev), dev["label"].to_numpy(), features(test), C)
    ci = bootstrap_ci(spec.task, test["label"].to_numpy(), test_probs, n_boot=n_boot, seed=0)
    return OracleScores(names, cv, ci, test_probs)
