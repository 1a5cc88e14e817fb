"""prepare: raw layout -> validated manifest + preprocessed cache (docs/architecture.md, stage 1).

Order matters: read and validate everything first (all problems reported together, nothing
written), then build the cache, then write the manifest atomically. A failed or interrupted run
leaves a previous prepare in the same output folder intact.
"""
from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from cfcml.data.adapters import ADAPTERS
from cfcml.data.cache import build_cache, cache_dir_for
from cfcml.data.images import max_image_bytes
from cfcml.data.manifest import INFO_FILE, MANIFEST_FILE, PreparedDataset, build_manifest, fingerprint, write_manifest
from cfcml.data.spec import DatasetSpec, load_dataset_spec, spec_to_dict
from cfcml.data.validation import DatasetValidationError, ValidationReport, default_workers, validate_records
from cfcml.outputs import check_output_dir, check_output_file


def validate_dataset(root: Path, spec: DatasetSpec, *, folds: int = 5, fold_seed: int = 0,
                     csv: Path | None = None, workers: int | None = None
                     ) -> tuple[pd.DataFrame | None, ValidationReport]:
    """Read `root` with the adapter of the spec's `source.layout` and validate it: (records, report)."""
    root = Path(root).resolve()
    report = ValidationReport(spec.name, root)
    if not root.is_dir():
        report.add("missing_folder", "dataset root does not exist", file=str(root))
        return None, report
    records = ADAPTERS[spec.source.layout](root, spec, report, csv=csv, seed=fold_seed)
    validate_records(records, spec, root, folds, report, workers=workers or default_workers(), fold_seed=fold_seed)
    return records, report


def default_prepared_name(spec: DatasetSpec) -> str:
    """"prepared" for a layout's own config (men, derm7pt), "prepared-<name>" for another config
    of the same raw data (e.g. derm7pt_public), so that the two never overwrite each other."""
    return "prepared" if spec.name == spec.source.layout else f"prepared-{spec.name}"


def prepare_dataset(dataset: str, root: str | Path, out: str | Path | None = None, *, folds: int = 5,
                    fold_seed: int = 0, image_size: tuple[int, ...] | None = None, spec: str | Path | None = None,
                    csv: str | Path | None = None, workers: int | None = None, progress: bool = False,
                    log: Callable[[str], None] | None = None) -> PreparedDataset:
    """Validate `root`, build the cache and write `<out>/manifest.parquet` (default out:
    `<root>/prepared`, or `<root>/prepared-<spec name>` for a config that is not the layout's
    own). Raises DatasetValidationError carrying the full report on any problem, and
    cfcml.outputs.OutputPathError (a ValueError) before reading anything when `out` is a file,
    lies under a file, is not writable, or its manifest.parquet / prepare.json would be `csv`;
    ValueError when $CFCML_MAX_IMAGE_BYTES (images.max_image_bytes) is not a size.
    Ctrl-C raises PrepareInterrupted (a KeyboardInterrupt, one line) once the folders this run
    created (the output folder, or `cache/` or the cache folder of this size inside an existing
    one) are removed; an error while writing removes them too. A folder that existed before the
    run, a previous prepare's, is never removed.

    dataset: a dataset config name (conf/datasets/<dataset>.yaml) or a dataset YAML path; its
    `source.layout` picks the adapter. spec: a dataset YAML that replaces it ("manifest" + spec is
    the older spelling of a custom dataset). fold_seed: seeds the cross-validation folds (and a
    manifest hold-out); recorded in the manifest.
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    root = Path(root).resolve()
    if spec is None and dataset == "manifest":
        raise ValueError("the manifest adapter needs a dataset YAML (spec=... / --spec PATH)")
    ds_spec = load_dataset_spec(spec or dataset, image_size)
    max_image_bytes()  # a bad $CFCML_MAX_IMAGE_BYTES: ValueError now, not once per image
    out_dir = Path(out).resolve() if out else root / default_prepared_name(ds_spec)
    # before any image is read: a folder that cannot be written, or that would replace an input
    inputs = [Path(csv)] if csv else []
    check_output_dir(out_dir, inputs, what="prepare's output folder")
    for name in (MANIFEST_FILE, INFO_FILE):
        check_output_file(out_dir / name, inputs, what="prepare's output")
    workers = workers or default_workers()
    cache_dir = cache_dir_for(out_dir, ds_spec)
    created = _first_missing(cache_dir)  # the topmost folder this run creates (None: all exist already)
    try:
        return _prepare(root, ds_spec, out_dir, cache_dir, folds, fold_seed, csv, workers, progress, log, t0)
    except BaseException as exc:  # Ctrl-C or an error while writing: what this run created goes
        removed = _remove_partial(created, out_dir, cache_dir)
        if isinstance(exc, KeyboardInterrupt):
            raise PrepareInterrupted(_interrupted(removed, out_dir, cache_dir)) from None
        raise


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C during `prepare_dataset`, raised after the folders the run had created were removed
    (never one that existed before it); str() is one line saying what was removed."""


def _first_missing(path: Path) -> Path | None:
    """The topmost missing folder on the way to `path` (what mkdir(parents=True) would create)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _remove_partial(created: Path | None, out_dir: Path, cache_dir: Path) -> Path | None:
    """Remove the folder tree this run created (None when it created none) and its temporary
    files in folders that existed before; returns the removed folder, if any."""
    if created is not None and created.exists():
        shutil.rmtree(created, ignore_errors=True)
        return created
    for tmp in (out_dir / (INFO_FILE + ".tmp"), out_dir / (MANIFEST_FILE + ".tmp"), cache_dir / "cache.json.tmp"):
        tmp.unlink(missing_ok=True)
    return None


def _interrupted(removed: Path | None, out_dir: Path, cache_dir: Path) -> str:
    if removed is not None:
        return f"interrupted: prepare stopped and removed its partial output {removed}"
    if cache_dir.exists():
        return (f"interrupted: prepare stopped; the manifest in {out_dir} was not replaced (cache entries already "
                "built are kept for the next run)")
    return "interrupted: prepare stopped before writing anything"


def _prepare(root: Path, ds_spec: DatasetSpec, out_dir: Path, cache_dir: Path, folds: int, fold_seed: int,
             csv: str | Path | None, workers: int, progress: bool, log: Callable[[str], None],
             t0: float) -> PreparedDataset:
    """prepare_dataset's work once its output folder was checked: validate, cache, write."""
    records, report = validate_dataset(root, ds_spec, folds=folds, fold_seed=fold_seed,
                                       csv=Path(csv) if csv else None, workers=workers)
    if not report.ok:
        raise DatasetValidationError(report)
    assert records is not None  # None comes only with a report that is not ok
    t_valid = time.perf_counter() - t0
    for w in report.warnings:
        log(f"warning: {w.render()}")
    log(f"validated {len(records)} patients in {t_valid:.1f}s")

    manifest = build_manifest(records, ds_spec, folds, fold_seed)
    stats = build_cache(manifest, ds_spec, root, cache_dir, workers=workers, progress=progress,
                        hashes=report.content_hashes)
    info = {
        "dataset": ds_spec.source.layout,
        "spec_name": ds_spec.name,
        "spec": spec_to_dict(ds_spec),
        "root": str(root),
        "cache_dir": cache_dir.relative_to(out_dir).as_posix(),
        "image_size": {m.name: list(m.size) for m in ds_spec.modalities},
        "folds": folds,
        "fold_seed": fold_seed,
        "counts": _counts(manifest, ds_spec.classes),
        "fingerprint": fingerprint(manifest, root, ds_spec, report.content_hashes),
        "cache": stats,
        "warnings": [w.render() for w in report.warnings],  # e.g. clip saturation, for the record
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"validate": round(t_valid, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    write_manifest(manifest, out_dir, info)
    return PreparedDataset(out_dir, manifest, info)


def _counts(manifest: pd.DataFrame, classes: tuple[str, ...]) -> dict:
    """Patients per class, per split and per development fold (classes in spec order)."""

    def per_class(frame: pd.DataFrame) -> dict[str, int]:
        counts = frame["label_name"].value_counts()
        return {c: int(counts.get(c, 0)) for c in classes}

    dev = manifest[manifest["split"] == "dev"]
    return {"split": {s: per_class(g) for s, g in manifest.groupby("split")},
            "fold": {int(k): per_class(g) for k, g in dev.groupby("fold")}}


def summary(prepared: PreparedDataset) -> str:
    info = prepared.info
    lines = [f"prepared {info['spec_name']} ({info['dataset']} adapter) from {info['root']}",
             f"  output {prepared.out_dir}  cache {prepared.cache_dir.name}  fingerprint {info['fingerprint']}",
             f"  image size {info['image_size']}  folds {info['folds']} (fold seed {prepared.fold_seed})"]
    for split, counts in info["counts"]["split"].items():
        lines.append(f"  {split:<5} {sum(counts.values()):>5} patients  {counts}")
    for k, counts in info["counts"]["fold"].items():
        lines.append(f"  fold {k}  {sum(counts.values()):>4} patients  {counts}")
    c, s = info["cache"], info["seconds"]
    lines.append(f"  cache: {c['built']} images built, {c['reused']} reused; "
                 f"time {s['total']:.1f}s (validation {s['validate']:.1f}s)")
    return "\n".join(lines)
