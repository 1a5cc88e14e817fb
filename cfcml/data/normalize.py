"""Tabular normalisation, fitted on a training fold only.

Numeric fields are z-scored with the training fold's mean/std (missing values ignored in the fit,
then encoded as 0.0 with a missing flag); categorical fields become their index in the spec's
vocabulary, -1 when missing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cfcml.data.spec import DatasetSpec


@dataclass
class TabularArrays:
    num: np.ndarray  # float32 [N, F_num], normalised, missing -> 0.0
    num_missing: np.ndarray  # bool [N, F_num]
    cat: np.ndarray  # int64 [N, F_cat], category index or -1


class TabularNormalizer:
    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.numeric = [f.name for f in spec.numeric_fields]
        self.categorical = spec.categorical_fields
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, train: pd.DataFrame) -> TabularNormalizer:
        """Statistics of the numeric fields over `train` (the training fold), ignoring missing."""
        values = self._numeric(train)  # [N, F], NaN = missing
        with warnings.catch_warnings():  # "mean of empty slice" for a field missing everywhere
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0) if len(values) else np.zeros(len(self.numeric))
            std = np.nanstd(values, axis=0) if len(values) else np.ones(len(self.numeric))
        mean = np.nan_to_num(mean, nan=0.0)  # a field missing everywhere in the fold
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        self.mean, self.std = mean.astype(np.float64), std.astype(np.float64)
        return self

    def transform(self, df: pd.DataFrame) -> TabularArrays:
        if self.mean is None or self.std is None:
            raise RuntimeError("TabularNormalizer.transform called before fit")
        values = self._numeric(df)
        missing = np.isnan(values)
        num = np.where(missing, 0.0, (values - self.mean) / self.std).astype(np.float32)
        cat = np.full((len(df), len(self.categorical)), -1, dtype=np.int64)
        for j, f in enumerate(self.categorical):
            index = {c: i for i, c in enumerate(f.categories)}
            for i, v in enumerate(df[f.name].tolist()):
                if pd.isna(v):  # None, NaN or pd.NA, whatever the column dtype
                    continue
                if str(v) not in index:
                    raise ValueError(f"column {f.name!r}: {v!r} is not one of {list(f.categories)}")
                cat[i, j] = index[str(v)]
        return TabularArrays(num=num.reshape(len(df), len(self.numeric)), num_missing=missing, cat=cat)

    def _numeric(self, df: pd.DataFrame) -> np.ndarray:
        if not self.numeric:
            return np.zeros((len(df), 0), dtype=np.float64)
        return df[self.numeric].to_numpy(dtype=np.float64, na_value=np.nan)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able statistics, to ship with a model for inference."""
        assert self.mean is not None and self.std is not None
        return {"fields": self.numeric, "mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check `state` (from `state_dict`) against this normaliser, fitted on the same training
        rows (a restored fold): the datasets were built with these statistics, so a checkpoint
        whose statistics differ (the prepared data changed under it) raises ValueError rather than
        being resumed with inputs scaled otherwise than its weights learnt. Unfitted: takes them."""
        other = TabularNormalizer.from_state(self.spec, state)
        assert other.mean is not None and other.std is not None  # from_state sets both
        if self.mean is None or self.std is None:
            self.mean, self.std = other.mean, other.std
            return
        if not (np.allclose(self.mean, other.mean, rtol=1e-9, atol=0)
                and np.allclose(self.std, other.std, rtol=1e-9, atol=0)):
            raise ValueError("the checkpoint's normaliser statistics differ from this fold's training rows: "
                             "the prepared dataset changed since the checkpoint was written")

    @classmethod
    def from_state(cls, spec: DatasetSpec, state: dict[str, Any]) -> TabularNormalizer:
        norm = cls(spec)
        if list(state["fields"]) != norm.numeric:
            raise ValueError(f"normaliser fields {state['fields']} do not match the spec's {norm.numeric}")
        norm.mean, norm.std = np.asarray(state["mean"], float), np.asarray(state["std"], float)
        return norm
