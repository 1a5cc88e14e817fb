"""The per-worker loop without Ray: K folds in lockstep, out-of-fold predictions, state round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_men import prepare_tiny_men, tiny_experiment

from cfcml.config import OptimConfig
from cfcml.training import CrossValidation, Split, TrainingDiverged, lr_factor


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    return prepare_tiny_men(tmp_path_factory.mktemp("train"), patients=30, seed=3)


@pytest.fixture(scope="module")
def cfg():
    return tiny_experiment(loss={"momentum": 0.5})


def test_lr_schedule_warms_up_then_steps():
    cfg = OptimConfig(lr=1.0, warmup_epochs=5, step_size=5, gamma=0.8)
    assert [lr_factor(e, cfg) for e in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert [lr_factor(e, cfg) for e in (5, 9, 10, 15)] == [1.0, 1.0, 0.8, pytest.approx(0.64)]


def test_folds_train_in_lockstep_and_predict_every_dev_patient_once(prepared, cfg):
    torch.manual_seed(0)
    cv = CrossValidation(prepared, [Split(*prepared.fold_frames(k)) for k in range(2)], cfg)
    assert cfg.model.scan == "auto" and cv.scan_backend == "chunked"  # what the trial reports: auto on CPU
    metrics, oof = cv.run_epoch()
    assert metrics["epoch"] == 1 and cv.epoch == 1
    for k in range(2):
        assert f"val_macro_auc_fold{k}" in metrics and f"train_loss_fold{k}" in metrics
    mean = (metrics["val_accuracy_fold0"] + metrics["val_accuracy_fold1"]) / 2
    assert metrics["cv_accuracy"] == pytest.approx(mean)
    dev = prepared.dev_frame()
    assert sorted(oof["patient_id"]) == sorted(dev["patient_id"])  # each dev patient exactly once
    assert set(oof["patient_id"]).isdisjoint(prepared.test_frame()["patient_id"])
    probs = oof[[f"prob_{c}" for c in prepared.spec.classes]].to_numpy()
    assert probs.sum(1) == pytest.approx(1.0, rel=1e-5)
    for fold in cv.folds:  # each fold's scheduler stepped once per epoch, its bank saw data
        assert fold.scheduler.last_epoch == 1 and bool(fold.criterion.bank.filled.any())


def test_state_round_trip_restores_every_fold(prepared, cfg, tmp_path: Path):
    splits = [Split(*prepared.fold_frames(k)) for k in range(2)]
    torch.manual_seed(0)
    cv = CrossValidation(prepared, splits, cfg)
    cv.run_epoch()
    torch.save(cv.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(123)  # a different initialisation, then overwritten by the checkpoint
    other = CrossValidation(prepared, splits, cfg)
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert other.epoch == 1
    for a, b in zip(cv.folds, other.folds):
        for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(pa, pb), name
        assert torch.equal(a.criterion.bank.p_bank, b.criterion.bank.p_bank)
        assert a.optimizer.state_dict()["state"].keys() == b.optimizer.state_dict()["state"].keys()
        assert a.normalizer.state_dict() == b.normalizer.state_dict()


def test_a_checkpoint_whose_normaliser_no_longer_fits_the_training_rows_is_refused(prepared, cfg):
    splits = [Split(*prepared.fold_frames(k)) for k in range(2)]
    cv = CrossValidation(prepared, splits, cfg)
    state = cv.state_dict()
    norm = state["folds"][1]["normalizer"]
    norm["mean"] = [m + 1.0 for m in norm["mean"]]  # statistics of other rows than fold 1's training rows
    with pytest.raises(ValueError, match="normaliser statistics differ"):
        CrossValidation(prepared, splits, cfg).load_state_dict(state)


def test_final_mode_trains_on_all_dev_rows_without_validation(prepared, cfg):
    cv = CrossValidation(prepared, [Split(prepared.dev_frame(), None)], cfg)
    metrics, oof = cv.run_epoch()
    assert oof.empty and not any(k.startswith(("val_", "cv_")) for k in metrics)
    assert metrics["train_loss"] > 0


def test_input_dropout_is_off_by_default_and_seeded_per_fold_and_epoch(prepared, cfg):
    splits = [Split(*prepared.fold_frames(k)) for k in range(2)]
    assert CrossValidation(prepared, splits, cfg)._input_dropout(0) is None  # the published recipe
    torch.manual_seed(0)
    cv = CrossValidation(prepared, splits, cfg.replace({"train": {"modality_dropout": 0.5, "field_dropout": 0.5}}))

    from cfcml.predict import ModelInputs
    batch = next(iter(cv.folds[0].train_loader))
    inputs = ModelInputs.from_batch(batch, "cpu")
    a, b = cv._input_dropout(0)(inputs), cv._input_dropout(0)(inputs)
    assert torch.equal(a.num_missing, b.num_missing) and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert a.num_missing.any() or (a.cat == -1).any()
    metrics, _ = cv.run_epoch()  # trains with whole inputs withheld
    assert metrics["train_loss"] > 0


@pytest.mark.parametrize("lr", [1e6, 1e12])
def test_a_diverging_run_stops_naming_fold_and_epoch(prepared, cfg, lr):
    """A learning rate that blows the weights up stops the run at the end of the first epoch it
    happens in, with the fold and epoch named, instead of training on NaN."""
    import pickle

    torch.manual_seed(0)
    cv = CrossValidation(prepared, [Split(*prepared.fold_frames(k)) for k in range(2)],
                         cfg.replace({"optim.lr": lr, "optim.warmup_epochs": 1}))
    with pytest.raises(TrainingDiverged, match=r"^training diverged: fold 0, epoch 1: non-finite ") as info:
        cv.run_epoch()
    assert (info.value.fold, info.value.epoch) == (0, 1) and cv.epoch == 0
    back = pickle.loads(pickle.dumps(TrainingDiverged(1, 3, "training loss (loss=nan)", trial="trial abc")))
    assert str(back).startswith("training diverged: trial abc, fold 1, epoch 3: non-finite training loss")


def test_non_finite_weights_are_caught_before_validation(prepared, cfg):
    """Finite losses but NaN weights after the last step (the kind that ended in 'probs holds NaN')."""
    torch.manual_seed(0)
    cv = CrossValidation(prepared, [Split(*prepared.fold_frames(k)) for k in range(2)], cfg)

    steps = [0]

    def poison(k, fold):  # after fold 0's last step: every loss of the epoch was finite
        steps[0] += 1
        if steps[0] == len(fold.train_loader):
            with torch.no_grad():
                next(fold.model.parameters()).fill_(float("nan"))

    cv.step_hook = poison
    with pytest.raises(TrainingDiverged, match=r"fold 0, epoch 1: non-finite validation probabilities"):
        cv.run_epoch()
