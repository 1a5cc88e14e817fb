"""The preprocessed image cache: every image decoded, normalised and resampled once, at prepare time.

One `.npy` per patient and modality (float16, read memory-mapped), in a folder named after the image
size and a hash of the preprocessing settings, so another size or intensity handling builds another
cache beside it. `cache.json` records the source file of each entry by its content hash (BLAKE2b of
its bytes, `validation.content_hash`); a rerun of prepare reuses an entry only when the source's
bytes are unchanged. Size and modification time are not trusted: an image edited in place with
its mtime kept (`cp -p`, `rsync -t`) is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cfcml.data.images import preprocess, read_image
from cfcml.data.spec import DatasetSpec
from cfcml.data.validation import content_hash

CACHE_DTYPE = np.float16  # z-scored MRI and [0, 1] photos lose nothing that matters; half the disk/IO
CACHE_VERSION = 2  # 2: entries keyed by content hash; volumes in canonical (RAS+) orientation


def cache_settings(spec: DatasetSpec) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "dtype": np.dtype(CACHE_DTYPE).name,
            "modalities": {m.name: {"size": list(m.size), "channels": m.channels} for m in spec.modalities},
            "intensity": {"mode": spec.intensity.mode,
                          "clip": None if spec.intensity.clip is None else list(spec.intensity.clip),
                          "scale": spec.intensity.scale}}


def cache_dir_for(out_dir: Path, spec: DatasetSpec) -> Path:
    """out/cache/<size>-<settings hash>, e.g. cache/128x128x24-1a2b3c4d."""
    settings = cache_settings(spec)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    sizes = sorted({"x".join(map(str, m.size)) for m in spec.modalities})
    return Path(out_dir) / "cache" / f"{'_'.join(sizes)}-{digest}"


def cache_file(cache_dir: Path, patient_id: str, modality: str) -> Path:
    """File-system-safe name; ids with other characters get a hash suffix so they stay distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(patient_id))[:80]
    if safe != str(patient_id):
        safe += "-" + hashlib.sha1(str(patient_id).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{safe}__{modality}.npy"


def expected_bytes(shape: tuple[int, ...]) -> int:
    """The size of an intact cache file of `shape`: `np.save`'s header (format 1.0, padded to 64
    bytes) plus the CACHE_DTYPE array."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(CACHE_DTYPE)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return len(header.getvalue()) + int(np.prod(shape)) * np.dtype(CACHE_DTYPE).itemsize


def damage(path: Path, shape: tuple[int, ...]) -> str | None:
    """Why the cache file `path` of an array of `shape` cannot be read (None if it can), from its
    size alone: missing, or shorter or longer than an intact file (`expected_bytes`)."""
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({(exc.strerror or str(exc)).lower()})"
    want = expected_bytes(shape)
    if size < want:
        return f"is truncated ({size} of {want} bytes)"
    if size > want:
        return f"is {size} bytes, {want} expected"
    return None


def damaged_entries(manifest: pd.DataFrame, spec: DatasetSpec, cache_dir: Path) -> list[tuple[str, str, Path, str]]:
    """(patient id, modality, file, what is wrong) of every cache file of `manifest` that is
    missing, truncated or of another size than its modality's shape needs (one `stat` a file)."""
    out = []
    for pid in manifest["patient_id"]:
        for m in spec.modalities:
            path = cache_file(cache_dir, pid, m.name)
            problem = damage(path, (m.channels, *m.size))
            if problem:
                out.append((str(pid), m.name, path, problem))
    return out


def build_cache(manifest: pd.DataFrame, spec: DatasetSpec, root: Path, cache_dir: Path, workers: int = 1,
                progress: bool = False, hashes: dict[str, str] | None = None) -> dict[str, int]:
    """Decode + preprocess every image of the manifest into `cache_dir`; returns counts.

    hashes: root-relative path -> content_hash, as validation computed them (saves reading every
    file again); a path missing from it is hashed here."""
    hashes = hashes or {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / "cache.json"
    old = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    entries: dict[str, dict[str, Any]] = old.get("entries", {}) if old.get("settings") == cache_settings(spec) else {}

    jobs = []
    for row in manifest.to_dict("records"):
        for m in spec.modalities:
            rel = row[f"path_{m.name}"]
            src = Path(root) / rel
            target = cache_file(cache_dir, row["patient_id"], m.name)
            stamp = {"source": rel, "blake2b": hashes.get(rel) or content_hash(src)}
            if entries.get(target.name) == stamp and damage(target, (m.channels, *m.size)) is None:
                continue  # unchanged source, intact entry (a truncated or deleted one is rebuilt)
            jobs.append((src, m, target, stamp))

    def work(job):  # -> (file name, stamp)
        src, m, target, stamp = job
        arr = preprocess(read_image(src, m), m, spec.intensity).astype(CACHE_DTYPE)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, target)  # a crash never leaves a half-written entry under the real name
        return target.name, stamp

    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="caching images", unit="img")
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for name, stamp in pool.map(work, jobs):
            entries[name] = stamp
            if bar is not None:
                bar.update()
    finally:  # on Ctrl-C or an error: the queued images are dropped, the ones in flight finish (no .tmp left)
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": cache_settings(spec), "entries": entries}, indent=1, sort_keys=True),
                   encoding="utf-8")
    os.replace(tmp, meta_path)
    n_total = len(manifest) * len(spec.modalities)
    return {"built": len(jobs), "reused": n_total - len(jobs), "total": n_total}


class CacheReader:
    """Fast reads of one modality's cache files, which all share dtype and shape: the .npy header
    is parsed once, then each read is a single np.fromfile (np.load re-parses the header with
    `ast` on every call, a tenth of the per-sample cost at 128x128x24)."""

    def __init__(self, first_file: Path, expected_shape: tuple[int, ...]):
        with open(first_file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if tuple(shape) != tuple(expected_shape) or fortran:
            raise ValueError(f"{first_file}: cached array has shape {list(shape)}, expected "
                             f"{list(expected_shape)}; rerun prepare")
        self.shape, self.dtype = tuple(shape), dtype
        self.count = int(np.prod(shape))

    def read(self, path: Path) -> np.ndarray:
        arr = np.fromfile(path, dtype=self.dtype, count=self.count, offset=self.offset)
        if arr.size != self.count:
            raise ValueError(f"{path}: cache file is truncated; rerun prepare")
        return arr.reshape(self.shape)

