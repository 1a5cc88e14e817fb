"""The outer folds of nested cross-validation: development patients only, grouped by patient,
stratified by class, the same for the same patients and seed; and each outer fold's view of the
dataset: outer-training patients as development with their own inner folds, outer-held-out patients
as its test split, the dataset's test split nowhere, its normalisers fitted on outer-training rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfcml.config import ConfigError
from cfcml.data.manifest import PreparedDataset
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.hpo.outer import outer_split, outer_view

SIZE = (16, 16, 4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    root = make_men(tmp_path_factory.mktemp("outer") / "men", patients=40, seed=3, size=SIZE)
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=SIZE)


def test_outer_folds_cover_every_development_patient_once_and_no_test_patient(prepared) -> None:
    outer = outer_split(prepared, 3)
    dev = set(prepared.dev_frame()["patient_id"].astype(str))
    assert set(outer.index) == dev and outer.index.is_unique  # each patient in exactly one outer fold
    assert not set(outer.index) & set(prepared.test_frame()["patient_id"].astype(str))
    assert sorted(outer.unique()) == [0, 1, 2]


def test_outer_folds_are_stratified_by_class(prepared) -> None:
    outer = outer_split(prepared, 2)
    dev = prepared.dev_frame().set_index(prepared.dev_frame()["patient_id"].astype(str))
    table = dev["label_name"].groupby(outer.reindex(dev.index)).value_counts().unstack(fill_value=0)
    assert (table.max(axis=0) - table.min(axis=0)).max() <= 1  # every class split as evenly as it can be


def test_outer_folds_are_deterministic_and_follow_the_fold_seed(prepared, tmp_path: Path) -> None:
    assert outer_split(prepared, 2).equals(outer_split(prepared, 2))
    reseeded = prepare_dataset("men", prepared.root, tmp_path / "seed7", folds=2, fold_seed=7, image_size=SIZE)
    assert not outer_split(reseeded, 2).equals(outer_split(prepared, 2))


def test_outer_folds_ignore_the_test_split(prepared, altered_copy, tmp_path: Path) -> None:
    other = altered_copy(prepared, tmp_path / "other", lambda m: m["split"] == "test")
    assert outer_split(other, 2).equals(outer_split(prepared, 2))


def test_too_many_outer_folds_for_a_class_is_a_config_error(prepared) -> None:
    with pytest.raises(ConfigError, match="at least 2 outer folds"):
        outer_split(prepared, 1)
    smallest = int(prepared.dev_frame()["label_name"].value_counts().min())
    with pytest.raises(ConfigError, match="fewer development patients than outer folds"):
        outer_split(prepared, smallest + 1)


def test_an_outer_view_holds_outer_training_as_development_and_outer_held_out_as_test(prepared,
                                                                                       tmp_path: Path) -> None:
    outer = outer_split(prepared, 2)
    view = outer_view(prepared, outer, 1, 2, tmp_path / "view")
    again = PreparedDataset.load(tmp_path / "view")  # what a Ray Train worker loads
    held = set(outer.index[outer == 1])
    assert set(again.test_frame()["patient_id"]) == held
    assert set(again.dev_frame()["patient_id"]) == set(outer.index[outer == 0])
    assert not set(again.manifest["patient_id"]) & set(prepared.test_frame()["patient_id"])
    assert sorted(again.dev_frame()["fold"].unique()) == [0, 1] and again.folds == 2
    for k in range(2):
        train, val = again.fold_frames(k)
        assert not (set(train["patient_id"]) | set(val["patient_id"])) & held
    # the images are the base dataset's cache, read where they are
    pid = str(again.dev_frame()["patient_id"].iloc[0])
    modality = prepared.spec.modalities[0].name
    assert again.cache_path(pid, modality) == prepared.cache_path(pid, modality)
    assert again.cache_path(pid, modality).is_file()
    # the normaliser of the final retrain (all of the view's development rows) sees outer-training rows only
    fitted = again.fit_normalizer(again.dev_frame()).state_dict()
    rows = prepared.dev_frame()[prepared.dev_frame()["patient_id"].isin(outer.index[outer == 0])]
    assert fitted == prepared.fit_normalizer(rows).state_dict()
    # written again with the same rows: the same folder, the same fingerprint
    assert outer_view(prepared, outer, 1, 2, tmp_path / "view").fingerprint == view.fingerprint
    assert outer_view(prepared, outer, 0, 2, tmp_path / "view0").fingerprint != view.fingerprint


def test_an_outer_view_whose_inner_folds_would_lack_a_class_is_a_config_error(prepared, tmp_path: Path) -> None:
    outer = outer_split(prepared, 2)
    inner = int(np.ceil(len(outer) / 2))  # more inner folds than any class has outer-training patients
    with pytest.raises(ConfigError, match="outer fold 0"):
        outer_view(prepared, outer, 0, inner, tmp_path / "view")
