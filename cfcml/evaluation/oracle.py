"""The oracle of a synthetic dataset: how well the generator's own latent signals predict the class.

A synthetic dataset written by `cfcml.data.synthetic` keeps the noisy latent signals it drew the
images and the table from in `_synthetic_latents.csv`, beside the raw layout. A logistic
regression on those signals (and their pairwise products, so that an interaction of image and
table is reachable) is the reference a model can hope to approach: it sees exactly the
information the generator put in, without having to read it off pixels.

Reports and comparisons read it; training and model selection never do. It uses the same folds as
the models (fit on each training fold, scored on its validation fold) and, for the test figure,
is fit on all development rows and scored once on the test rows.

Which classes need both modalities (`ClassReach`): the same oracle is also given one modality's
latent signals alone (`image_signal`, `table_signal`: the part of a column name before
`_signal` names its modality). A class whose one-vs-rest AUC with both modalities' signals
exceeds the better single-modality AUC by `CROSSMODAL_MARGIN` or more, on the development folds'
out-of-fold predictions, is a *crossmodal* class: no model can identify it from one modality, so
a model that does has learnt the interaction (on the interaction cohort of `cfcml.data.synthetic`,
MEN's Grade 1: an exclusive or of the two latents). The test figures of the same fits are the
yardstick comparisons measure each method against (`tuning.evidence.comparison`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cfcml.data.manifest import PreparedDataset
from cfcml.data.synthetic import LATENTS_FILE
from cfcml.evaluation.metrics import bootstrap_ci, class_aucs, compute_metrics

CROSSMODAL_MARGIN = 0.15  # joint one-vs-rest AUC above the better single-modality one
BOTH = "both"  # the key of the oracle given every modality's signals (and their products)


@dataclass(frozen=True)
class ClassReach:
    """How well one modality's latent signals alone, and all of them together, identify a class.

    Args:
        name: the class.
        cv: one-vs-rest AUC per source ("image", "table", ..., and `BOTH`) of the out-of-fold
            predictions over the development folds (the figure that decides `crossmodal`).
        test: the same per source, fit on all development rows and scored on the test rows.
    """

    name: str
    cv: dict[str, float]
    test: dict[str, float]

    @property
    def single(self) -> dict[str, float]:
        """The single-modality figures of `cv`."""
        return {k: v for k, v in self.cv.items() if k != BOTH}

    @property
    def crossmodal(self) -> bool:
        """Both modalities together beat the better one alone by `CROSSMODAL_MARGIN` (CV)."""
        single = [v for v in self.single.values() if np.isfinite(v)]
        return bool(single) and np.isfinite(self.cv[BOTH]) and self.cv[BOTH] - max(single) >= CROSSMODAL_MARGIN

    @property
    def ceiling(self) -> float:
        """The best one-vs-rest test AUC of one modality alone: what a model must beat to show that
        it combines the modalities on this class (NaN when none is defined)."""
        single = [v for k, v in self.test.items() if k != BOTH and np.isfinite(v)]
        return max(single) if single else float("nan")


@dataclass
class OracleScores:
    features: list[str]  # the latent signals (and products) it was given
    cv: dict[str, float]  # mean over validation folds, like a trial's cv_* metrics
    test: dict[str, tuple[float, float, float]]  # (point, low, high) per metric on the test split
    test_probs: np.ndarray  # [N_test, C], in test_frame() order
    reach: list[ClassReach] = field(default_factory=list)  # per class, in the spec's order

    @property
    def crossmodal(self) -> list[int]:
        """Indices of the classes no single modality identifies (`ClassReach.crossmodal`)."""
        return [k for k, r in enumerate(self.reach) if r.crossmodal]


def _signals(latents: pd.DataFrame) -> list[str]:
    return [c for c in latents.columns if c.endswith("_signal")]


def _design(latents: pd.DataFrame, signals: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """The signals' values and their pairwise products: float [N, S + S(S-1)/2], with the names."""
    signals = _signals(latents) if signals is None else signals
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
    return OracleScores(names, cv, ci, test_probs, class_reach(prepared, latents, list(spec.classes)))


def class_reach(prepared: PreparedDataset, latents: pd.DataFrame, classes: list[str]) -> list[ClassReach]:
    """`ClassReach` of every class: the oracle given each modality's signals alone and all of them,
    one-vs-rest AUC per class on the development folds (out of fold) and on the test split.

    latents: the generator's `LATENTS_FILE` (first column the patient id, `<modality>_signal` columns).
    """
    ids = latents.iloc[:, 0].astype(str)
    rows = dict(zip(ids, range(len(ids))))
    signals = _signals(latents)
    sources = {s.removesuffix("_signal"): [s] for s in signals}
    sources[BOTH] = signals
    C = len(classes)
    cv: dict[str, list[float]] = {}
    test: dict[str, list[float]] = {}
    dev, test_rows = prepared.dev_frame(), prepared.test_frame()
    for source, columns in sources.items():
        x_all, _ = _design(latents, columns)

        def features(frame: pd.DataFrame, x_all: np.ndarray = x_all) -> np.ndarray:
            return x_all[[rows[str(p)] for p in frame["patient_id"]]]

        oof, labels = [], []
        for k in range(prepared.folds):
            train, val = prepared.fold_frames(k)
            oof.append(_fit_predict(features(train), train["label"].to_numpy(), features(val), C))
            labels.append(val["label"].to_numpy())
        y_oof, p_oof = np.concatenate(labels), np.concatenate(oof)
        p_test = _fit_predict(features(dev), dev["label"].to_numpy(), features(test_rows), C)
        y_test = test_rows["label"].to_numpy()
        cv[source] = class_aucs(y_oof, p_oof)
        test[source] = class_aucs(y_test, p_test)
    return [ClassReach(name, {s: cv[s][k] for s in sources}, {s: test[s][k] for s in sources})
            for k, name in enumerate(classes)]

