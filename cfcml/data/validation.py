"""Validation of a dataset read by an adapter: every problem is collected, then reported at once.

Adapters report structural problems (missing table or column, image folders without a table row...)
while reading; `validate_records` then checks every row and every image file of the uniform
records table. Nothing is written until the report is empty.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cfcml.data.images import ImageError, read_image
from cfcml.data.spec import DatasetSpec, ImageModality


@dataclass(frozen=True)
class Problem:
    code: str  # short kind, e.g. "missing_file", "unknown_category"; tests match on it
    message: str  # names the culprit: file, patient, column
    patient: str | None = None
    file: str | None = None
    column: str | None = None

    def render(self) -> str:
        where = [f"patient {self.patient!r}" if self.patient is not None else None,
                 f"column {self.column!r}" if self.column else None,
                 f"file {self.file}" if self.file else None]
        loc = ", ".join(w for w in where if w)
        return f"[{self.code}] " + (f"{loc}: " if loc else "") + self.message


@dataclass
class ValidationReport:
    dataset: str
    root: Path
    problems: list[Problem] = field(default_factory=list)

    def add(self, code: str, message: str, *, patient: str | None = None, file: str | Path | None = None,
            column: str | None = None) -> None:
        self.problems.append(Problem(code, message, patient, None if file is None else str(file), column))

    def extend(self, problems: list[Problem]) -> None:
        self.problems.extend(problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    def codes(self) -> set[str]:
        return {p.code for p in self.problems}

    def render(self) -> str:
        if self.ok:
            return f"{self.dataset} at {self.root}: no problems found"
        lines = [f"{self.dataset} at {self.root}: {len(self.problems)} problem(s) found, nothing was written"]
        lines += [f"  {p.render()}" for p in self.problems]
        return "\n".join(lines)


class DatasetValidationError(Exception):
    """Raised by prepare when validation found problems; str() is the full report."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.render())
        self.report = report


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


def check_path(root: Path, rel: str) -> Path:
    """Absolute path of a root-relative path; ValueError when it escapes the root (.., absolute,
    or a symlink pointing outside)."""
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise ValueError(f"path {rel!r} escapes the dataset root {root}")
    return full


def validate_records(records: pd.DataFrame, spec: DatasetSpec, root: Path, folds: int,
                     report: ValidationReport, workers: int = 1) -> None:
    """Check every row and image of the uniform records table (see adapters.py) into `report`."""
    root = root.resolve()
    if records.empty:
        report.add("empty_dataset", f"no patients found for {spec.name} under {root}")
        return
    _check_ids(records, report)
    _check_labels(records, spec, report)
    _check_fields(records, spec, report)
    _check_images(records, spec, root, report, workers)
    _check_class_sizes(records, spec, folds, report)


def _check_ids(records: pd.DataFrame, report: ValidationReport) -> None:
    ids = records["patient_id"].astype(str)
    for idx in ids[ids.str.strip() == ""].index:
        report.add("missing_id", f"{records.at[idx, 'origin']} has an empty patient id")
    dup = ids[ids.duplicated(keep=False) & (ids.str.strip() != "")]
    for pid, rows in dup.groupby(dup).groups.items():
        where = "; ".join(str(records.at[r, "origin"]) for r in rows)
        report.add("duplicate_id", f"patient id appears {len(rows)} times ({where})", patient=pid)


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
            if is_missing(value, spec):
                if not f.optional:
                    report.add("missing_value", f"value {value!r} is missing and field {f.name!r} is not optional",
                               patient=pid, column=f.name)
            elif f.kind == "numeric":
                try:
                    parse_numeric(value, spec)
                except ValueError:
                    report.add("bad_numeric", f"{value!r} is not a finite number", patient=pid, column=f.name)
            elif str(value).strip() not in f.categories:
                report.add("unknown_category", f"{value!r} is not one of {list(f.categories)}",
                           patient=pid, column=f.name)


def _check_images(records: pd.DataFrame, spec: DatasetSpec, root: Path, report: ValidationReport,
                  workers: int) -> None:
    jobs = []
    for row in records.to_dict("records"):
        for m in spec.modalities:
            rel = row.get(f"path_{m.name}")
            if rel is None or (isinstance(rel, float) and math.isnan(rel)) or str(rel).strip() == "":
                report.add("missing_file", f"no {m.name} image given", patient=row["patient_id"],
                           column=f"path_{m.name}")
                continue
            jobs.append((row["patient_id"], m, str(rel)))

    def check(job: tuple[str, ImageModality, str]) -> tuple[str, str, str, str] | None:
        pid, m, rel = job
        try:
            path = check_path(root, rel)
        except ValueError as exc:
            return "path_escape", str(exc), pid, rel
        if not path.is_file():
            return "missing_file", f"{m.name} image does not exist", pid, rel
        try:
            arr = read_image(path, m)
        except ImageError as exc:
            return exc.code, f"{m.name} image: {exc}", pid, rel
        if spec.intensity.mode == "zscore_nonzero" and not arr.any():
            return "empty_image", f"{m.name} image: every voxel is 0 (nothing to normalise)", pid, rel
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding (zlib, libjpeg) releases the GIL
        for result in pool.map(check, jobs):
            if result is not None:
                code, msg, pid, rel = result
                report.add(code, msg, patient=pid, file=rel)


def _check_class_sizes(records: pd.DataFrame, spec: DatasetSpec, folds: int, report: ValidationReport) -> None:
    dev = records[records["split"] == "dev"]
    if dev.empty:
        report.add("empty_dataset", "the development split has no patients")
        return
    counts = dev["label_name"].value_counts()
    for c in spec.classes:
        n = int(counts.get(c, 0))
        if n < folds:
            report.add("small_class", f"class {c!r} has {n} development patient(s), fewer than the {folds} folds")


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)
