"""The clinical evidence of one model: fitted on out-of-fold predictions only, evaluated on test,
rendered as tables and a model card whose numbers all come from the records."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from cfcml.evaluation.calibrator import Calibrator
from cfcml.training import prediction_frame
from tuning.evidence.clinical import clinical_evidence, report_sections, to_json
from tuning.records.outcome import SearchOutcome, TrialResult
from tuning.release.model_card import CardInputs, model_card


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("clinical") / "men", patients=60, seed=0, size=(8, 8, 4))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(8, 8, 4))


def overconfident(rows: pd.DataFrame, classes, seed: int) -> pd.DataFrame:
    """Predictions that rank well but are too sure (logits x 3)."""
    rng = np.random.default_rng(seed)
    y = rows["label"].to_numpy()
    z = 3 * (rng.normal(size=(len(y), len(classes))) + 1.5 * np.eye(len(classes))[y])
    p = np.exp(z - z.max(1, keepdims=True))
    return prediction_frame(rows, p / p.sum(1, keepdims=True), classes)


def withheld_of(test: pd.DataFrame, spec) -> dict:
    probs = test[[f"prob_{c}" for c in spec.classes]].to_numpy()
    flat = np.full_like(probs, 1 / len(spec.classes))
    return {"t1": ("modality", flat), "age": ("field", probs)}


def evidence(prepared, test_seed: int = 1, test_rows=None):
    spec = prepared.spec
    oof = overconfident(prepared.dev_frame(), spec.classes, seed=0)
    rows = prepared.test_frame() if test_rows is None else test_rows
    test = overconfident(rows, spec.classes, seed=test_seed)
    return clinical_evidence(spec, oof, "out-of-fold predictions of trial t0", test, rows, withheld_of(test, spec),
                             n_boot=100)


def test_temperature_and_thresholds_are_unchanged_when_the_test_rows_change(prepared) -> None:
    a = evidence(prepared, test_seed=1)
    rows = pd.concat([prepared.test_frame()] * 2, ignore_index=True)  # other patients, other probabilities
    b = evidence(prepared, test_seed=7, test_rows=rows)
    assert a.calibrator == b.calibrator
    assert a.n_test != b.n_test
    assert a.calibration["test, raw"] != b.calibration["test, raw"]


def test_the_temperature_lowers_the_out_of_fold_nll(prepared) -> None:
    ev = evidence(prepared)
    t = ev.calibrator.temperature
    assert t.t > 1.5  # the predictions were made 3x too sharp
    assert t.nll_after < t.nll_before
    assert ev.calibration["out-of-fold, calibrated"].nll == pytest.approx(t.nll_after, rel=1e-6)


def test_every_section_is_rendered_from_the_evidence(prepared) -> None:
    ev = evidence(prepared)
    text = "\n".join(report_sections(ev, ["macro_auc", "balanced_accuracy"]))
    for heading in ("Calibration", "Operating points", "Decision curves", "Subgroups", "Missing inputs"):
        assert f"## {heading}" in text
    assert f"T = {ev.calibrator.temperature.t:.3f}" in text
    assert text.count("| sensitivity_0.90 |") == len(prepared.spec.classes)  # one per class, one-vs-rest
    assert "| sex | 0 |" in text and "| age_band |" in text
    assert "| t1 | modality |" in text
    assert {"clinical/reliability_oof.png", "clinical/reliability_test.png", "clinical/decision_curve_test.png",
            "clinical/missing_inputs_test.png"} == set(ev.figures)
    import json
    json.dumps(to_json(ev), default=float)  # plain data


def test_calibrator_round_trips_and_names_its_points(prepared) -> None:
    c = evidence(prepared).calibrator
    assert Calibrator.from_dict(c.to_dict()) == c
    assert c.point("Grade_1:youden").class_name == "Grade_1"
    with pytest.raises(KeyError, match="known: Grade_1:sensitivity_0.90"):
        c.point("youden")  # three classes: the class must be named


def test_model_card_numbers_come_from_the_records(prepared, tmp_path: Path) -> None:
    ev = evidence(prepared)
    best = TrialResult("t0", score=0.91, epoch=4, epochs_run=6, metrics={"cv_macro_auc": 0.91},
                       last_epoch_metrics={"cv_macro_auc": 0.87})
    outcome = SearchOutcome("men", "cv_macro_auc", [best], str(tmp_path / "men-demo"), "p", "u", "1", "r")
    test = {"macro_auc": (0.88, 0.8, 0.95), "acc_class_1": (0.0, 0.0, 0.0)}
    text = model_card(CardInputs("cfcml-men", 3, "final", prepared, outcome, best, test, ev, ev.calibrator, "run1"))
    assert "# Model card: `cfcml-men` version 3" in text
    assert prepared.fingerprint in text
    dev = prepared.info["counts"]["split"]["dev"]
    assert f"| dev | {dev['Grade_1']} | {dev['Grade_2_invasion']} |" in text
    assert "Best trial `t0` at its selected epoch 4: selected_cv_macro_auc = 0.9100" in text
    assert "optimistic): macro_auc 0.910" in text and "At its last epoch (6; `last_epoch_cv_*`" in text
    assert "| macro_auc | 0.880 [0.800, 0.950] |" in text
    assert "## Calibration" in text and "## Known limits" in text
    assert "**synthetic** cohort" in text
    assert "never correctly predicts Grade_2_invasion" in text
    assert "every image modality is required" in text
    assert "nan" not in text.lower().replace("nanmean", "")
    assert not math.isnan(ev.calibration["test, calibrated"].ece[0])


def test_a_card_without_test_or_calibration_says_so(prepared, tmp_path: Path) -> None:
    best = TrialResult("t0", score=0.8, epoch=2, epochs_run=2, metrics={"cv_macro_auc": 0.8})
    outcome = SearchOutcome("men", "cv_macro_auc", [best], str(tmp_path / "men-x"), "p", "u", "1", "r")
    text = model_card(CardInputs("cfcml-men", 1, "cv-ensemble", prepared, outcome, best, None, None, None, "run2"))
    assert "fold ensemble (probabilities averaged)" in text and "No test evaluation." in text
    assert "no temperature or operating points were stored" in text
    assert "Not evaluated on the held-out test split" in text
