"""Checkpoints: atomic files with an index written last; a damaged one is named and skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cfcml.config import load_experiment
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from cfcml.training import CrossValidation, Split
from tuning.records.checkpoints import (
    INDEX_FILE,
    METRICS_FILE,
    OOF_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointReader,
    restorable,
    write_checkpoint,
)

SIZE = (32, 32, 8)


@pytest.fixture(scope="module")
def cv(tmp_path_factory: pytest.TempPathFactory) -> CrossValidation:
    root = make_men(tmp_path_factory.mktemp("ckpt") / "men", patients=18, seed=2, size=SIZE)
    prepared = prepare_dataset("men", root, folds=2, fold_seed=0, image_size=SIZE)
    cfg = load_experiment("men").replace({
        "model": {"encoder_width": 4, "mixer_stages": [4], "dim": 16, "latents_img": 2, "latents_tab": 2},
        "train": {"batch_size": 6, "folds": 2}, "loss": {"momentum": 0.5}})
    torch.manual_seed(0)
    cv = CrossValidation(prepared, [Split(*prepared.fold_frames(k)) for k in range(2)], cfg)
    cv.run_epoch()
    return cv


def _write(cv: CrossValidation, d: Path, epoch_metric: float = 0.5) -> Path:
    oof = pd.DataFrame({"patient_id": ["a"], "label": [0], "prob_x": [1.0]})
    return write_checkpoint(d, cv.state_dict(), {"epoch": cv.epoch, "cv_macro_auc": epoch_metric}, oof)


def test_round_trip_loads_with_weights_only(cv: CrossValidation, tmp_path: Path) -> None:
    reader = CheckpointReader(_write(cv, tmp_path / "checkpoint_1"))
    assert reader.epoch == 1 and reader.metrics()["cv_macro_auc"] == 0.5
    state = reader.state()  # torch.load(weights_only=True): no pickled code in our own checkpoints
    cv.load_state_dict(state)
    weights = reader.fold_weights()
    assert len(weights) == 2 and set(weights[0].normalizer) == {"fields", "mean", "std"}
    key = next(iter(weights[0].model))
    assert torch.equal(weights[0].model[key], cv.folds[0].model.state_dict()[key])
    assert list(reader.oof()["patient_id"]) == ["a"]
    with pytest.raises(CheckpointError, match="no test predictions"):
        reader.test_predictions()


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:100]), "truncated"),
    (lambda d: (d / METRICS_FILE).write_text(json.dumps({"epoch": 9, "cv_macro_auc": 0.51})), "truncated|corrupt"),
    (lambda d: (d / OOF_FILE).unlink(), "missing from the checkpoint"),
    (lambda d: (d / INDEX_FILE).unlink(), "not completely written"),
])
def test_damaged_checkpoint_is_named(cv: CrossValidation, tmp_path: Path, damage, match) -> None:
    d = _write(cv, tmp_path / "checkpoint_1")
    damage(d)
    with pytest.raises(CheckpointError, match=match) as info:
        CheckpointReader(d)
    assert str(d) in str(info.value)


def test_same_size_corruption_is_caught_by_the_hash(cv: CrossValidation, tmp_path: Path) -> None:
    d = _write(cv, tmp_path / "checkpoint_1")
    raw = bytearray((d / STATE_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / STATE_FILE).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointReader(d)


def test_restorable_falls_back_to_the_newest_intact_older_checkpoint(cv: CrossValidation, tmp_path: Path) -> None:
    run = tmp_path / "trial_x"
    older = _write(cv, run / "checkpoint_2026-01-01_00-00-01.000000", 0.4)
    middle = _write(cv, run / "checkpoint_2026-01-01_00-00-02.000000", 0.6)
    latest = _write(cv, run / "checkpoint_2026-01-01_00-00-03.000000", 0.7)
    _write(cv, run / "checkpoint_2026-01-01_00-00-04.000000", 0.9)  # newer than `latest`: never used
    (latest / STATE_FILE).write_bytes(b"garbage")
    messages: list[str] = []
    reader = restorable(latest, log=messages.append)
    assert reader is not None and reader.dir == middle and reader.metrics()["cv_macro_auc"] == 0.6
    assert len(messages) == 1 and str(latest / STATE_FILE) in messages[0]
    (middle / INDEX_FILE).unlink()
    assert restorable(latest, log=messages.append).dir == older
    (older / STATE_FILE).unlink()
    assert restorable(latest, log=messages.append) is None
