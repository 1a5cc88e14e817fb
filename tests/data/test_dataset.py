"""Normalisation, the torch Datasets, augmentation and the class-balanced sampler."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from cfcml.data.dataset import CachedDataset, ClassBalancedBatchSampler, RawDataset
from cfcml.data.normalize import TabularNormalizer
from cfcml.data.transforms import apply_augment, build_augment, seed_augment

MEN_SIZE, DERM_SIZE = (12, 12, 6), (16, 16)


# --- tabular normalisation -----------------------------------------------------------------------

def test_normalisation_is_fitted_on_the_training_fold_only(men_prepared) -> None:
    train, val = men_prepared.fold_frames(0)
    norm = men_prepared.fit_normalizer(train)
    stats = norm.state_dict()
    val_changed = val.assign(age=val["age"] * 10 + 1000, oedema_area=np.nan)
    assert men_prepared.fit_normalizer(train).state_dict() == stats
    norm.transform(val_changed)  # transforming validation rows does not refit
    assert norm.state_dict() == stats
    assert np.allclose(stats["mean"][0], train["age"].mean()) and np.allclose(stats["std"][0], train["age"].std(ddof=0))
    arrays = norm.transform(train)
    assert np.allclose(arrays.num.mean(axis=0), 0, atol=1e-5) and np.allclose(arrays.num.std(axis=0), 1, atol=1e-4)


def test_missing_values_and_categories_are_encoded(men_prepared) -> None:
    train, _ = men_prepared.fold_frames(0)
    frame = train.head(3).copy()
    frame.loc[0, "oedema_area"] = np.nan
    frame.loc[1, "location"] = None
    arrays = TabularNormalizer(men_prepared.spec).fit(train).transform(frame)
    assert arrays.num.shape == (3, 4) and arrays.cat.shape == (3, 2)
    assert arrays.num_missing[0].tolist() == [False, False, False, True] and arrays.num[0, 3] == 0.0
    assert arrays.cat[1, 0] == -1
    assert arrays.cat[0, 0] == ["1", "2", "3"].index(frame.loc[0, "location"])
    with pytest.raises(ValueError, match="location"):
        TabularNormalizer(men_prepared.spec).fit(train).transform(frame.assign(location="9"))


def test_normaliser_state_round_trip(men_prepared) -> None:
    train, val = men_prepared.fold_frames(1)
    norm = men_prepared.fit_normalizer(train)
    again = TabularNormalizer.from_state(men_prepared.spec, norm.state_dict())
    np.testing.assert_array_equal(again.transform(val).num, norm.transform(val).num)


# --- datasets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["men_prepared", "derm_prepared"])
def test_cached_sample_format(name: str, request: pytest.FixtureRequest) -> None:
    prepared = request.getfixturevalue(name)
    train, val = prepared.fold_frames(0)
    ds = prepared.dataset(val, prepared.fit_normalizer(train), augment=False)
    spec = prepared.spec
    sample = ds[2]
    assert len(ds) == len(val) and sample["index"] == 2
    assert [tuple(x.shape) for x in sample["images"]] == [(m.channels, *m.size) for m in spec.modalities]
    assert all(x.dtype == torch.float32 for x in sample["images"])
    assert sample["num"].dtype == torch.float32 and sample["num"].shape == (len(spec.numeric_fields),)
    assert sample["num_missing"].dtype == torch.bool and sample["cat"].dtype == torch.int64
    assert sample["cat"].shape == (len(spec.categorical_fields),)
    assert sample["label"].dtype == torch.int64 and int(sample["label"]) == int(val.loc[2, "label"])
    batch = next(iter(DataLoader(ds, batch_size=4)))  # default collate
    assert batch["images"][0].shape == (4, spec.modalities[0].channels, *spec.modalities[0].size)
    assert batch["label"].shape == (4,) and batch["index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["men_prepared", "derm_prepared"])
def test_raw_and_cached_datasets_agree(name: str, request: pytest.FixtureRequest) -> None:
    prepared = request.getfixturevalue(name)
    frame = prepared.dev_frame()
    norm = prepared.fit_normalizer(frame)
    cached = prepared.dataset(frame, norm)
    raw = RawDataset(frame, prepared.spec, prepared.root, norm)
    for i in range(3):
        for a, b in zip(cached[i]["images"], raw[i]["images"]):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)  # float16 cache


def test_augmentation_is_seeded_and_keeps_shapes(men_prepared) -> None:
    frame = men_prepared.dev_frame()
    norm = men_prepared.fit_normalizer(frame)
    a = CachedDataset(frame, men_prepared.spec, men_prepared.cache_dir, norm, augment=True, seed=5)
    b = CachedDataset(frame, men_prepared.spec, men_prepared.cache_dir, norm, augment=True, seed=5)
    plain = men_prepared.dataset(frame, norm)
    changed = 0
    for i in range(6):
        xa, xb, x0 = a[i]["images"], b[i]["images"], plain[i]["images"]
        for u, v, w in zip(xa, xb, x0):
            assert u.shape == w.shape and u.dtype == torch.float32
            torch.testing.assert_close(u, v)
            changed += not torch.equal(u, w)
    assert changed > 0


@pytest.mark.parametrize("name", ["men_prepared", "derm_prepared"])
def test_one_random_draw_for_all_modalities(name: str, request: pytest.FixtureRequest) -> None:
    """Identical images in every modality stay identical: every random draw is shared."""
    spec = request.getfixturevalue(name).spec
    transform = build_augment(spec)
    seed_augment(transform, 0)
    m = spec.modalities[0]
    base = torch.rand(m.channels, *m.size)
    changed = 0
    for _ in range(8):
        stacked = torch.cat([base] * len(spec.modalities))
        out = apply_augment(transform, stacked, [mod.channels for mod in spec.modalities])
        assert [tuple(x.shape) for x in out] == [(mod.channels, *mod.size) for mod in spec.modalities]
        changed += not torch.equal(out[0], base)
        for x in out[1:]:
            torch.testing.assert_close(x, out[0])
    assert changed > 0


def test_independent_noise_option(men_prepared) -> None:
    spec = men_prepared.spec
    spec = dataclasses.replace(spec, augment=dataclasses.replace(
        spec.augment, random_resized_crop=None, flip=None,
        gaussian_noise=dataclasses.replace(spec.augment.gaussian_noise, prob=1.0, independent=True)))
    transform = build_augment(spec)
    out = apply_augment(transform, torch.zeros(3, *spec.modalities[0].size), [1, 1, 1])
    assert not torch.equal(out[0], out[1]) and 0.05 < float(out[0].std()) < 0.2


def test_dataloader_workers_draw_different_augmentations(men_prepared) -> None:
    frame = men_prepared.dev_frame()
    norm = men_prepared.fit_normalizer(frame)
    one = frame.iloc[[0] * 8].reset_index(drop=True)  # the same patient eight times
    ds = CachedDataset(one, men_prepared.spec, men_prepared.cache_dir, norm, augment=True, seed=1)
    torch.manual_seed(0)  # the workers' seeds derive from it: a fixed draw, not a 1-in-64 coin
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    vols = [b["images"][0][0] for b in loader]  # workers 0 and 1 alternate
    assert not all(torch.equal(a, b) for a, b in zip(vols[0::2], vols[1::2]))


def test_cached_dataset_reports_a_missing_cache(men_prepared, tmp_path) -> None:
    frame = men_prepared.dev_frame()
    with pytest.raises(FileNotFoundError, match="rerun prepare"):
        CachedDataset(frame, men_prepared.spec, tmp_path, men_prepared.fit_normalizer(frame))


def test_test_rows_only_through_test_frame(men_prepared) -> None:
    test_ids = set(men_prepared.test_frame()["patient_id"])
    assert test_ids and not test_ids & set(men_prepared.dev_frame()["patient_id"])
    assert (men_prepared.test_frame()["split"] == "test").all()
    with pytest.raises(IndexError):
        men_prepared.fold_frames(3)


# --- class-balanced sampler ----------------------------------------------------------------------

def test_class_balanced_batches() -> None:
    labels = np.array([0] * 40 + [1] * 6 + [2] * 2)
    sampler = ClassBalancedBatchSampler(labels, batch_size=7, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7  # ceil(48 / 7)
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=3)
        assert len(batch) == 7 and counts.min() >= 2 and counts.max() <= 3
    assert batches == list(sampler)  # same epoch, same draw
    sampler.set_epoch(1)
    assert batches != list(sampler)
    other_rank = ClassBalancedBatchSampler(labels, batch_size=7, seed=0, num_replicas=2, rank=1)
    assert len(other_rank) == 4 and list(other_rank) != batches[:4]


def test_class_balanced_sampler_in_a_loader(derm_prepared) -> None:
    frame = derm_prepared.dev_frame()
    ds = derm_prepared.dataset(frame, derm_prepared.fit_normalizer(frame))
    loader = DataLoader(ds, batch_sampler=ClassBalancedBatchSampler(ds.labels, batch_size=4, seed=0))
    for batch in loader:
        assert batch["label"].tolist().count(0) == 2 and batch["label"].tolist().count(1) == 2
    with pytest.raises(ValueError, match="smaller than"):
        ClassBalancedBatchSampler(pd.Series([0, 1, 2]), batch_size=2)
