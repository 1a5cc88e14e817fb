"""The manifest (the single thing training reads) and the handle on a prepared dataset.

`<out>/manifest.parquet` has one row per patient: patient_id, label (class index), label_name,
split ("dev" | "test"), fold (0..K-1 for dev, -1 for test), path_<modality> (relative to the
dataset root), then the clinical fields (numeric: float, NaN = missing; categorical: text, None =
missing). The prepare record (spec, root, folds, fold seed, counts, fingerprint) rides in the Parquet
metadata, so the manifest file alone is the atomic commit point of a prepare run; `prepare.json`
beside it is a human-readable copy.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cfcml.data.cache import cache_file
from cfcml.data.normalize import TabularNormalizer
from cfcml.data.spec import DatasetSpec, spec_from_dict
from cfcml.data.splits import assign_folds
from cfcml.data.validation import content_hash, is_missing, parse_numeric

if TYPE_CHECKING:
    from cfcml.data.dataset import CachedDataset

MANIFEST_FILE = "manifest.parquet"
INFO_FILE = "prepare.json"
_META_KEY = b"cfcml.prepare"


def build_manifest(records: pd.DataFrame, spec: DatasetSpec, folds: int, seed: int) -> pd.DataFrame:
    """Typed manifest from validated records, with folds assigned; dev rows first, then by id."""
    df = pd.DataFrame({
        "patient_id": records["patient_id"].astype(str),
        "label": records["label_name"].map(spec.classes.index).astype("int64"),
        "label_name": records["label_name"].astype(str),
        "split": records["split"].astype(str),
    })
    df["fold"] = assign_folds(df["patient_id"], df["label"], df["split"], folds, seed)
    for m in spec.modalities:
        df[f"path_{m.name}"] = records[f"path_{m.name}"].astype(str)
    for f in spec.fields:
        if f.kind == "numeric":
            df[f.name] = [float("nan") if (x := parse_numeric(v, spec)) is None else x for v in records[f.name]]
        else:
            df[f.name] = pd.Series([None if is_missing(v, spec) else str(v).strip() for v in records[f.name]],
                                   index=records.index, dtype=object)
    order = df.assign(_test=df["split"] == "test").sort_values(["_test", "patient_id"]).index
    return df.loc[order].reset_index(drop=True)


def fingerprint(manifest: pd.DataFrame, root: Path, spec: DatasetSpec, hashes: dict[str, str] | None = None) -> str:
    """Hash of the manifest rows (folds included), the bytes of every image file and the
    preprocessing settings: it changes whenever what a model would train or be tested on changes,
    an image edited in place included (same name, size and mtime). The MLflow dataset digest.

    hashes: root-relative path -> content_hash already computed (by validation); others are read."""
    hashes = hashes or {}
    h = hashlib.sha256()
    h.update(manifest.sort_values("patient_id").to_csv(index=False).encode())
    for m in spec.modalities:
        h.update(f"{m.name}:{list(m.size)}:{m.channels}".encode())
        for rel in sorted(manifest[f"path_{m.name}"]):
            h.update(f"{rel}:{hashes.get(rel) or content_hash(Path(root) / rel)}".encode())
    h.update(json.dumps(spec.intensity.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_manifest(manifest: pd.DataFrame, out_dir: Path, info: dict[str, Any]) -> Path:
    """Write prepare.json and then manifest.parquet, each atomically (tmp file + rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info_tmp = out_dir / (INFO_FILE + ".tmp")
    info_tmp.write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(info_tmp, out_dir / INFO_FILE)
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(info).encode()})
    path = out_dir / MANIFEST_FILE
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


class PreparedDataset:
    """A prepared dataset: manifest + spec + cache. Training code reads only this.

    The held-out test rows are reachable only through `test_frame()`: `fold_frames` and
    `dev_frame` return development rows only, so tuning code cannot touch the test split by accident.
    """

    def __init__(self, out_dir: Path, manifest: pd.DataFrame, info: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self._manifest = manifest
        self.info = info
        self.spec: DatasetSpec = spec_from_dict(info["spec"], f"{self.out_dir / MANIFEST_FILE} (spec)")

    @classmethod
    def load(cls, out_dir: str | Path) -> PreparedDataset:
        path = Path(out_dir) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest; run pipelines/prepare.py first")
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{path}: not written by cfcml prepare (no prepare metadata)")
        return cls(Path(out_dir), table.to_pandas(), json.loads(raw))

    # --- what the prepare run recorded -----------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.info["root"])

    @property
    def cache_dir(self) -> Path:
        return self.out_dir / self.info["cache_dir"]

    @property
    def folds(self) -> int:
        return int(self.info["folds"])

    @property
    def fold_seed(self) -> int:
        """The seed the folds were drawn with (older manifests call it "seed")."""
        return int(self.info.get("fold_seed", self.info.get("seed", 0)))

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    @property
    def manifest(self) -> pd.DataFrame:
        """The full table, test rows included: for summaries and reports, not for training."""
        return self._manifest.copy()

    # --- frames ------------------------------------------------------------------------------------
    def dev_frame(self) -> pd.DataFrame:
        """All development rows (final retraining on dev data)."""
        return self._rows(self._manifest["split"] == "dev")

    def fold_frames(self, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(train, validation) rows of fold k: validation = dev rows with fold == k."""
        if not 0 <= k < self.folds:
            raise IndexError(f"fold {k} out of range 0..{self.folds - 1}")
        dev = self._manifest["split"] == "dev"
        return self._rows(dev & (self._manifest["fold"] != k)), self._rows(dev & (self._manifest["fold"] == k))

    def test_frame(self) -> pd.DataFrame:
        """The held-out test rows: for the one final evaluation only."""
        return self._rows(self._manifest["split"] == "test")

    def _rows(self, mask: pd.Series) -> pd.DataFrame:
        return self._manifest[mask].reset_index(drop=True)

    # --- loading ---------------------------------------------------------------------------------
    def fit_normalizer(self, train: pd.DataFrame) -> TabularNormalizer:
        return TabularNormalizer(self.spec).fit(train)

    def dataset(self, frame: pd.DataFrame, normalizer: TabularNormalizer, augment: bool = False,
                seed: int | None = None) -> CachedDataset:
        """A CachedDataset over `frame` (rows of this dataset)."""
        from cfcml.data.dataset import CachedDataset

        return CachedDataset(frame, self.spec, self.cache_dir, normalizer, augment=augment, seed=seed)

    def cache_path(self, patient_id: str, modality: str) -> Path:
        return cache_file(self.cache_dir, patient_id, modality)
