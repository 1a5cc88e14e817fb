"""The synthetic oracle's class reach: which classes only both modalities together identify.

On the interaction cohort MEN's Grade 1 is an exclusive or of the image and the table latent, so
neither modality's signal alone ranks it (one-vs-rest AUC near 0.5) while both together do; on the
split cohort the image alone identifies Grade 1. Derm7pt's interaction makes both classes crossmodal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_derm7pt, make_men
from cfcml.evaluation.metrics import bootstrap_ci, class_auc_ci, class_aucs
from cfcml.evaluation.oracle import BOTH, CROSSMODAL_MARGIN, ClassReach, oracle_scores


@pytest.fixture(scope="module", params=["split", "interaction"])
def men(request, tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp(f"oracle-{request.param}") / "men", patients=160, seed=3,
                    size=(8, 8, 4), signal=request.param)
    return request.param, prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(8, 8, 4))


def test_men_grade_1_needs_both_modalities_only_on_the_interaction_cohort(men) -> None:
    signal, prepared = men
    oracle = oracle_scores(prepared, n_boot=20)
    assert oracle is not None
    reach = {r.name: r for r in oracle.reach}
    assert list(reach) == list(prepared.spec.classes)
    grade1 = reach["Grade_1"]
    assert set(grade1.cv) == set(grade1.test) == {"image", "table", BOTH}
    if signal == "interaction":
        assert grade1.crossmodal and 0 in oracle.crossmodal
        assert max(grade1.single.values()) < 0.7 < 0.85 < grade1.cv[BOTH]
        assert grade1.ceiling < 0.75  # one modality alone barely ranks it on the test split either
    else:
        assert not grade1.crossmodal and 0 not in oracle.crossmodal
        assert grade1.cv["image"] > 0.9  # the image alone separates Grade 1 from Grade 2


def test_derm7pt_interaction_makes_both_classes_crossmodal(tmp_path: Path) -> None:
    root = make_derm7pt(tmp_path / "derm", patients=160, seed=2, size=(16, 16), signal="interaction")
    prepared = prepare_dataset("derm7pt", root, folds=2, fold_seed=0, image_size=(16, 16))
    oracle = oracle_scores(prepared, n_boot=20)
    assert oracle is not None and oracle.crossmodal == [0, 1]


@pytest.mark.parametrize("cv,expected", [
    ({"image": 0.5, "table": 0.52, BOTH: 0.52 + CROSSMODAL_MARGIN}, True),
    ({"image": 0.5, "table": 0.52, BOTH: 0.51 + CROSSMODAL_MARGIN}, False),
    ({"image": 0.95, "table": 0.5, BOTH: 0.99}, False),
    ({"image": float("nan"), "table": float("nan"), BOTH: 0.9}, False),  # no single figure: nothing shown
])
def test_a_class_is_crossmodal_when_both_beat_the_better_single_modality_by_the_margin(cv, expected) -> None:
    assert ClassReach("c", cv, cv).crossmodal is expected


def test_per_class_aucs_match_the_bootstrap_points_and_pair_with_them() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    logits = np.eye(3)[y] * 1.5 + rng.normal(0, 1, (60, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    aucs = class_aucs(y, p)
    ci = class_auc_ci("multiclass", y, p, n_boot=200)
    assert [c[0] for c in ci] == pytest.approx(aucs)
    assert all(low <= point <= high for point, low, high in ci)
    assert np.mean(aucs) == pytest.approx(bootstrap_ci("multiclass", y, p, n_boot=10)["macro_auc"][0])
    assert np.isnan(class_aucs(np.zeros(5, int), np.full((5, 2), 0.5))[1])  # a class absent: undefined
