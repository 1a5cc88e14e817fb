"""Validation of a dataset read by an adapter: every problem is collected, then reported at once.

Adapters report structural problems (missing table or column, image folders without a table row...)
while reading; `validate_records` then checks every row and every image file of the uniform
records table. Nothing is written until the report is empty.
"""
from __future__ import annotations

import hashlib
import math
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cfcml.data.images import Geometry, ImageError, check_content, read_image_geometry
from cfcml.data.spec import DatasetSpec, ImageModality, TabularField
from cfcml.data.splits import assign_folds, split_problems
from cfcml.data.validation_report import DatasetValidationError, Problem, ValidationReport

__all__ = ["DatasetValidationError", "Problem", "ValidationReport", "validate_records"]


def is_missing(value: object, spec: DatasetSpec) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return str(value).strip() in spec.missing_values


def parse_numeric(value: object, spec: DatasetSpec) -> float | None:
    """float value, None for the missing token; raises ValueError for anything else (text, inf)."""
    if is_missing(value, spec):
        return None
    x = float(str(value).strip())  # ValueError for non-numeric text
    if not math.isfinite(x):
        raise ValueError(f"{value!r} is not a finite number")
    return x


def normalise_id(value: object) -> str:
    """The identity a patient id is compared by: Unicode NFKC, case folded, outer spaces removed,
    so "MEN_0005", "men_0005 " and full-width "ＭＥＮ_0005" are one patient."""
    return unicodedata.normalize("NFKC", str(value)).casefold().strip()


def content_hash(path: Path, chunk: int = 1 << 20) -> str:
    """BLAKE2b (128-bit) of the file's bytes, read in 1 MiB chunks: what identifies an image
    whatever its name, size or modification time."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_field_value(value: object, f: TabularField, spec: DatasetSpec) -> tuple[Any, tuple[str, str] | None]:
    """The one check of a clinical value, shared by prepare and the served model (predict).

    Returns (typed value, None): numeric -> float (NaN when missing), categorical -> the category
    text (None when missing); or (placeholder, (code, message)) when the value is refused:
    "missing_value" (blank or a missing token in a field that is not optional: its missing
    token was never trained), "bad_numeric", "unknown_category". A category read by JSON or a
    number-guessing reader as 1 or 1.0 is compared as the text "1".
    """
    numeric = f.kind == "numeric"
    if is_missing(value, spec) or (not isinstance(value, str) and pd.isna(value)):
        typed = float("nan") if numeric else None
        if f.optional:
            return typed, None
        return typed, ("missing_value", f"value {value!r} is missing and field {f.name!r} is not optional")
    if numeric:
        try:
            return parse_numeric(value, spec), None
        except (TypeError, ValueError):
            return float("nan"), ("bad_numeric", f"{value!r} is not a finite number")
    text = str(value).strip()
    if text not in f.categories and isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if text not in f.categories:
        return text, ("unknown_category", f"{value!r} is not one of {list(f.categories)}")
    return text, None


@dataclass
class CheckedImage:
    """One image as the validator read it: the array (float32 [C, *spatial], canonical orientation),
    its geometry (None for photos and .npy) and its warnings, (code, text) pairs:
    "clipped_image" (clip saturation, images.check_content) and "qform_sform_differ" (the two
    orientation fields of a NIfTI header differ numerically, images.check_orientation)."""

    array: np.ndarray
    geometry: Geometry | None
    warnings: list[tuple[str, str]] = field(default_factory=list)


def check_image(path: Path, m: ImageModality, spec: DatasetSpec) -> CheckedImage:
    """The one image check, shared by prepare and the served model (predict): check the size the
    header promises, decode fully, reorient, refuse degenerate content. ImageError (its `code` the
    problem kind) when the file is unreadable, truncated, of the wrong shape, larger than
    images.max_image_bytes() ("image_too_large", refused before decompressing), has a qform and an
    sform of different orientations ("orientation_conflict"), or carries nothing to normalise (see
    images.check_content)."""
    arr, geometry = read_image_geometry(path, m)
    warnings = []
    if geometry is not None and geometry.warning:
        warnings.append(("qform_sform_differ", geometry.warning))
    if (clipped := check_content(arr, spec.intensity)) is not None:
        warnings.append(("clipped_image", clipped))
    return CheckedImage(arr, geometry, warnings)


def geometry_problem(geometries: dict[str, Geometry | None]) -> str | None:
    """Why one patient's volumes (modality -> Geometry) do not share a voxel grid, or None.
    Photos and .npy arrays (no geometry) are not compared."""
    known = [(name, g) for name, g in geometries.items() if g is not None]
    for name, g in known[1:]:
        why = known[0][1].mismatch(g)
        if why is not None:
            return f"{name} and {known[0][0]} images do not share one voxel grid: {name} {why}"
    return None


def check_path(root: Path, rel: str) -> Path:
    """Absolute path of a root-relative path; ValueError when it escapes the root (.., absolute,
    or a symlink pointing outside)."""
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise ValueError(f"path {rel!r} escapes the dataset root {root}")
    return full


def validate_records(records: pd.DataFrame, spec: DatasetSpec, root: Path, folds: int,
                     report: ValidationReport, workers: int = 1, fold_seed: int = 0) -> None:
    """Check every row and image of the uniform records table (see adapters.py) into `report`;
    the splits on the folds `fold_seed` draws (as build_manifest will)."""
    root = root.resolve()
    if records.empty:
        report.add("empty_dataset", f"no patients found for {spec.name} under {root}")
        return
    _check_ids(records, report)
    _check_labels(records, spec, report)
    _check_fields(records, spec, report)
    _check_images(records, spec, root, report, workers)
    _check_splits(records, spec, folds, fold_seed, report)


def _check_ids(records: pd.DataFrame, report: ValidationReport) -> None:
    ids = records["patient_id"].astype(str)
    for idx in ids[ids.str.strip() == ""].index:
        report.add("missing_id", f"{records.at[idx, 'origin']} has an empty patient id")
    # identity after Unicode and case normalisation: MEN_0005 in train and men_0005 in test are one patient
    keys = ids.map(normalise_id)
    dup = keys[keys.duplicated(keep=False) & (keys != "")]
    for rows in dup.groupby(dup).groups.values():
        names = sorted({ids[r] for r in rows})
        where = "; ".join(f"{ids[r]!r} at {records.at[r, 'origin']} ({records.at[r, 'split']})" for r in rows)
        what = ("patient id appears" if len(names) == 1
                else f"patient ids {names} (one id ignoring case and Unicode form) appear")
        report.add("duplicate_id", f"{what} {len(rows)} times ({where})", patient=names[0])


def _check_labels(records: pd.DataFrame, spec: DatasetSpec, report: ValidationReport) -> None:
    for row in records.itertuples():
        if row.label_name not in spec.classes:
            report.add("unknown_label", f"label {row.label_name!r} ({row.origin}) is not one of the classes "
                       f"{list(spec.classes)}", patient=row.patient_id)


def _check_fields(records: pd.DataFrame, spec: DatasetSpec, report: ValidationReport) -> None:
    unchecked = records.attrs.get("unchecked_fields", set())  # table or column missing: reported already
    for f in spec.fields:
        if f.name not in records.columns or f.name in unchecked:
            continue
        for pid, value in zip(records["patient_id"], records[f.name]):
            _, problem = check_field_value(value, f, spec)
            if problem is not None:
                report.add(problem[0], problem[1], patient=pid, column=f.name)


def _check_images(records: pd.DataFrame, spec: DatasetSpec, root: Path, report: ValidationReport,
                  workers: int) -> None:
    """Every image of every patient: decoded, checked (check_image), its modalities on one voxel
    grid, its content hashed; then no file (by resolved path or by content) may serve two rows."""
    jobs = []
    for i, row in enumerate(records.to_dict("records")):
        mods = []
        for m in spec.modalities:
            rel = row.get(f"path_{m.name}")
            if rel is None or (isinstance(rel, float) and math.isnan(rel)) or str(rel).strip() == "":
                report.add("missing_file", f"no {m.name} image given", patient=row["patient_id"],
                           column=f"path_{m.name}")
                continue
            mods.append((m, str(rel)))
        jobs.append((i, row["patient_id"], mods))

    def check(job):  # -> (row, problems, warnings, [(rel, resolved path, content hash)])
        i, pid, mods = job
        problems, warnings, seen, geometries = [], [], [], {}
        for m, rel in mods:
            try:
                path = check_path(root, rel)
            except ValueError as exc:
                problems.append(("path_escape", str(exc), rel))
                continue
            if not path.is_file():
                problems.append(("missing_file", f"{m.name} image does not exist", rel))
                continue
            try:
                checked = check_image(path, m, spec)
            except ImageError as exc:
                problems.append((exc.code, f"{m.name} image: {exc}", rel))
                continue
            warnings += [(code, f"{m.name} image: {text}", rel) for code, text in checked.warnings]
            geometries[m.name] = checked.geometry
            seen.append((rel, str(path), content_hash(path)))
        if len(geometries) == len(spec.modalities) and (why := geometry_problem(geometries)):
            problems.append(("geometry_mismatch", why, ", ".join(rel for _, rel in mods)))
        return i, problems, warnings, seen

    by_path: dict[str, list[int]] = {}
    by_hash: dict[str, list[tuple[int, str]]] = {}
    pool = ThreadPoolExecutor(max(1, workers))  # decoding (zlib, libjpeg) releases the GIL
    try:
        for i, problems, warnings, seen in pool.map(check, jobs):
            pid = jobs[i][1]
            for code, msg, rel in problems:
                report.add(code, msg, patient=pid, file=rel)
            for code, msg, rel in warnings:
                report.warn(code, msg, patient=pid, file=rel)
            for rel, resolved, digest in seen:
                report.content_hashes[rel] = digest
                if i not in by_path.setdefault(resolved, []):
                    by_path[resolved].append(i)
                if all(j != i for j, _ in by_hash.setdefault(digest, [])):
                    by_hash[digest].append((i, rel))
    finally:  # on Ctrl-C: the queued files are dropped, not all read first
        pool.shutdown(wait=True, cancel_futures=True)
    _check_shared_images(records, root, by_path, by_hash, report)


def _check_shared_images(records: pd.DataFrame, root: Path, by_path: dict[str, list[int]],
                         by_hash: dict[str, list[tuple[int, str]]], report: ValidationReport) -> None:
    """One image file (the same resolved path, or byte-identical content under another name)
    behind two rows would put one scan in two patients, and possibly in both dev and test."""
    def who(i: int) -> str:
        return f"{records['patient_id'].iloc[i]!r} ({records['split'].iloc[i]})"

    for resolved, rows in by_path.items():
        if len(rows) > 1:
            rel = Path(resolved).relative_to(root).as_posix() if Path(resolved).is_relative_to(root) else resolved
            report.add("shared_image", f"one image file serves patients {', '.join(who(i) for i in rows)}",
                       patient=str(records["patient_id"].iloc[rows[0]]), file=rel)
    for hits in by_hash.values():
        if len(hits) > 1 and len({str(check_path(root, rel)) for _, rel in hits}) > 1:  # same path: reported above
            report.add("shared_image", "files with identical content serve patients "
                       + ", ".join(f"{who(i)} ({rel})" for i, rel in hits),
                       patient=str(records["patient_id"].iloc[hits[0][0]]), file=hits[0][1])


def _check_splits(records: pd.DataFrame, spec: DatasetSpec, folds: int, fold_seed: int,
                  report: ValidationReport) -> None:
    """Every class in the development split (enough for the folds), a test split, every fold's
    validation part non-empty (splits.split_problems), on the folds prepare will draw."""
    known = records["label_name"].isin(spec.classes)
    rows = records[known]
    fold = None
    dev_counts = rows.loc[rows["split"] == "dev", "label_name"].value_counts()
    if all(dev_counts.get(c, 0) >= folds for c in spec.classes):  # StratifiedKFold can draw them
        labels = rows["label_name"].map(spec.classes.index).astype("int64")  # as build_manifest does
        fold = assign_folds(rows["patient_id"].astype(str), labels, rows["split"].astype(str), folds, fold_seed)
    problems, warnings = split_problems(rows["split"], rows["label_name"], fold, spec.classes, folds,
                                        records.attrs.get("ignored_rows"))
    for code, message in problems:
        report.add(code, message)
    for code, message in warnings:
        report.warn(code, message)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)
