"""No leak from rows a fit must not see: the runs a search makes (`cv_splits`) are unchanged when
the test rows change (labels, clinical values, images), and a fold's normaliser and class weights
are unchanged when its validation rows change.

Each test also checks that the change it makes is visible to a fit that did see those rows, so
it would fail if the normaliser or the class counts came from all development rows, all rows, or
a fold's validation rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_men import prepare_tiny_men, tiny_experiment

from cfcml.data.manifest import PreparedDataset
from cfcml.training import CrossValidation, cv_splits


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return prepare_tiny_men(tmp_path_factory.mktemp("leak"), patients=30, seed=5)


@pytest.fixture(scope="module")
def cfg():
    return tiny_experiment(loss={"class_weights": "balanced"})


def _fitted(cv: CrossValidation) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Per fold: the normaliser's mean and sd and the class weights of the loss."""
    return [(f.normalizer.mean, f.normalizer.std, f.criterion.ce_weight.clone()) for f in cv.folds]


def _same(a: tuple, b: tuple) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("k", [0, 1])
def test_a_folds_normaliser_and_class_weights_do_not_move_with_its_validation_rows(prepared, cfg, altered_copy,
                                                                                  tmp_path: Path, k: int) -> None:
    other = altered_copy(prepared, tmp_path / "other", lambda m: (m["split"] == "dev") & (m["fold"] == k))
    before = _fitted(CrossValidation(prepared, cv_splits(prepared), cfg))
    after = _fitted(CrossValidation(other, cv_splits(other), cfg))
    assert _same(before[k], after[k])  # fold k's statistics: its training rows only
    # the folds that train on those rows see the change: a fit over them would have moved
    for j in set(range(prepared.folds)) - {k}:
        assert not np.array_equal(before[j][0], after[j][0]) and not torch.equal(before[j][2], after[j][2])


def test_changed_test_rows_change_no_metric_normaliser_or_class_weight(prepared, cfg, altered_copy,
                                                                      tmp_path: Path) -> None:
    other = altered_copy(prepared, tmp_path / "other", lambda m: m["split"] == "test")
    runs = []
    for data in (prepared, other):
        torch.manual_seed(0)
        cv = CrossValidation(data, cv_splits(data), cfg)
        metrics, oof = cv.run_epoch()
        final = CrossValidation(data, cv_splits(data, final=True), cfg)
        runs.append((metrics, oof, _fitted(cv), _fitted(final)))
    (m0, oof0, cv0, final0), (m1, oof1, cv1, final1) = runs
    assert m0.keys() == m1.keys()
    for key in m0:  # every fold's and the mean's validation metrics, every training loss
        assert m0[key] == m1[key] or (np.isnan(m0[key]) and np.isnan(m1[key])), key
    pd.testing.assert_frame_equal(oof0, oof1)
    for a, b in zip(cv0 + final0, cv1 + final1):
        assert _same(a, b)
    # the change is visible to a fit that reads the test rows
    leaky = [data.fit_normalizer(data.manifest).mean for data in (prepared, other)]
    assert not np.array_equal(*leaky)
