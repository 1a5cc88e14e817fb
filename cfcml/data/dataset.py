"""torch Datasets over manifest rows, and a class-balanced batch sampler.

One sample (the default collate batches it):
    {"images": [float32 [C, *size] per modality, in spec order], "num": float32 [F_num],
     "num_missing": bool [F_num], "cat": int64 [F_cat], "label": int64 [], "index": int}
`index` is the row position in the frame given to the dataset.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, cast

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from cfcml.data.cache import CacheReader, cache_file
from cfcml.data.images import preprocess, read_image
from cfcml.data.normalize import TabularNormalizer
from cfcml.data.spec import DatasetSpec
from cfcml.data.transforms import apply_augment, build_augment, seed_augment


class _ManifestDataset(Dataset):
    """Rows of a manifest frame (e.g. one of PreparedDataset.fold_frames(k)) as samples.

    normalizer: fitted on the training fold (PreparedDataset.fit_normalizer(train_frame)).
    augment: apply the spec's training augmentations (training folds only).
    seed: seeds the augmentation draws; give each data-parallel rank its own (seed + rank).
    """

    def __init__(self, frame: pd.DataFrame, spec: DatasetSpec, normalizer: TabularNormalizer,
                 augment: bool = False, seed: int | None = None):
        self.frame = frame.reset_index(drop=True)
        self.spec = spec
        self.channels = [m.channels for m in spec.modalities]
        tab = normalizer.transform(self.frame)  # whole frame once; __getitem__ only indexes
        self.num = torch.from_numpy(tab.num)
        self.num_missing = torch.from_numpy(tab.num_missing)
        self.cat = torch.from_numpy(tab.cat)
        labels = self.frame["label"] if "label" in self.frame else pd.Series(-1, index=self.frame.index)
        self.labels = torch.tensor(labels.to_numpy(dtype=np.int64))  # -1: unlabelled rows (inference)
        self.transform = build_augment(spec) if augment else None
        self._seed = seed
        self._seeded_for: tuple[int, int] | None = None
        if seed is not None:
            seed_augment(self.transform, seed)

    def __len__(self) -> int:
        return len(self.frame)

    def _load(self, i: int) -> list[np.ndarray]:  # [C, *size] per modality
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        self._reseed_in_worker()
        arrays = self._load(i)
        if self.transform is None:
            images = [torch.from_numpy(a).float() for a in arrays]  # float16 cache -> float32
        else:  # one stacked tensor [sum C, *spatial]: the conversion writes straight into it
            stacked = torch.empty((sum(self.channels), *arrays[0].shape[1:]), dtype=torch.float32)
            for block, a in zip(stacked.split(self.channels), arrays):
                block.copy_(torch.from_numpy(a))
            images = apply_augment(self.transform, stacked, self.channels)
        return {"images": images, "num": self.num[i], "num_missing": self.num_missing[i], "cat": self.cat[i],
                "label": self.labels[i], "index": i}

    def _reseed_in_worker(self) -> None:
        """DataLoader workers start with copies of one MONAI random state: reseed each from its
        torch worker seed (new every epoch, reproducible under torch.manual_seed), mixed with the
        dataset seed so that data-parallel ranks given different seeds draw differently."""
        info = get_worker_info()
        if self.transform is None or info is None:
            return
        key = (os.getpid(), info.id)
        if self._seeded_for != key:
            seed_augment(self.transform, info.seed + 7919 * (self._seed or 0))
            self._seeded_for = key


class CachedDataset(_ManifestDataset):
    """Reads the preprocessed cache; only augmentation runs per sample. The small per-image files
    (~0.8 MB at 128x128x24 float16) are read whole: from the page cache that is cheaper than
    setting up a memory map, and every voxel is used anyway."""

    def __init__(self, frame: pd.DataFrame, spec: DatasetSpec, cache_dir: Path, normalizer: TabularNormalizer,
                 augment: bool = False, seed: int | None = None):
        super().__init__(frame, spec, normalizer, augment, seed)
        names = [m.name for m in spec.modalities]
        self.files = [[cache_file(cache_dir, pid, m) for m in names] for pid in self.frame["patient_id"]]
        missing = [str(f) for row in self.files for f in row if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} cache file(s) missing, e.g. {missing[0]}; rerun prepare")
        self.readers = [CacheReader(self.files[0][j], (m.channels, *m.size)) if self.files else None
                        for j, m in enumerate(spec.modalities)]

    def _load(self, i: int) -> list[np.ndarray]:
        readers = cast(list[CacheReader], self.readers)  # None only where there are no files to load
        return [reader.read(f) for reader, f in zip(readers, self.files[i])]


class RawDataset(_ManifestDataset):
    """Decodes the raw files on every access (a naive pipeline): the benchmark's baseline, and a
    way to read rows that were never cached."""

    def __init__(self, frame: pd.DataFrame, spec: DatasetSpec, root: Path, normalizer: TabularNormalizer,
                 augment: bool = False, seed: int | None = None):
        super().__init__(frame, spec, normalizer, augment, seed)
        self.root = Path(root)

    def _load(self, i: int) -> list[np.ndarray]:
        row = self.frame.iloc[i]
        return [preprocess(read_image(self.root / row[f"path_{m.name}"], m), m, self.spec.intensity)
                for m in self.spec.modalities]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches with (nearly) equal counts of every class, drawn with replacement within a class.

    An epoch has ceil(N / batch_size) batches, like a plain loader. Each batch holds
    batch_size // C samples of every class, the remainder from randomly chosen classes. With
    several data-parallel workers give each its `rank`: the draws differ per rank. Call
    `set_epoch` for a new draw every epoch.
    """

    def __init__(self, labels: np.ndarray | torch.Tensor | list[int], batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.unique(labels)
        if batch_size < len(self.classes):
            raise ValueError(f"batch_size {batch_size} is smaller than the {len(self.classes)} classes")
        self.by_class = [np.flatnonzero(labels == c) for c in self.classes]
        self.batch_size = batch_size
        self.num_batches = math.ceil(len(labels) / batch_size / num_replicas)
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        per_class, extra = divmod(self.batch_size, len(self.classes))
        for _ in range(self.num_batches):
            counts = np.full(len(self.classes), per_class)
            counts[rng.choice(len(self.classes), size=extra, replace=False)] += 1
            batch = np.concatenate([rng.choice(idx, size=n, replace=True) for idx, n in zip(self.by_class, counts)])
            yield rng.permutation(batch).tolist()
