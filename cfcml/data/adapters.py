"""Adapters: read a raw dataset layout into one uniform records table.

Records columns: patient_id, label_name (the class, or the raw label when it is unknown, so that
validation names it), split ("dev" | "test"), origin (where the row came from, for messages),
path_<modality> (root-relative POSIX paths), and one column per clinical field holding the raw
text. Structural problems (missing table, column or folder; table rows without images and images
without a table row) go to the report; value-level checks are validation.py's job.

`records.attrs["ignored_rows"]`: how many rows each split lost to `source.ignored_labels`
("dev", "test", or "" where the split was not known yet), so that a split or class left empty
can be blamed on the label filtering.
"""
from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cfcml.config import ConfigError
from cfcml.data.spec import DatasetSpec
from cfcml.data.validation import ValidationReport, normalise_id

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".npy")
DEV_SPLITS = {"dev", "train", "training", "valid", "val", "validation"}


def read_table(path: Path, root: Path, report: ValidationReport) -> pd.DataFrame | None:
    """A CSV read by `read_text_csv`, or None when it is missing or refused (each problem reported,
    naming the file and the column); skipped blank rows are a warning naming their lines."""
    rel = _rel(path, root)
    if not path.is_file():
        report.add("missing_table", "table file does not exist", file=rel)
        return None
    try:
        table = read_text_csv(path)
    except TableError as exc:
        for code, message, column in exc.problems:
            report.add(code, message, file=rel, column=column)
        return None
    except OSError as exc:
        report.add("unreadable_table", f"cannot open the table ({exc.strerror or exc})", file=rel)
        return None
    if table.attrs["blank_lines"]:
        report.warn("blank_rows", blank_rows_note(table), file=rel)
    return table


class TableError(ValueError):
    """A CSV `read_text_csv` refuses. `problems`: (code, message, column or None) per problem,
    code "unreadable_table" (not UTF-8, not parseable, a row longer than the header) or
    "duplicate_column"; str() is the messages joined on one line."""

    def __init__(self, problems: Sequence[tuple[str, str, str | None]]):
        self.problems = list(problems)
        super().__init__("; ".join(message for _, message, _ in self.problems))


def read_text_csv(path: Path) -> pd.DataFrame:
    """The one CSV reader of every table a user gives (prepare's tables of every layout,
    predict's rows): all cells as text, nothing guessed ("007" stays "007", a blank stays ""), and
    the spelling variations of hand-edited or exported CSVs read alike: a UTF-8 byte-order mark,
    CRLF line ends, spaces after the commas, and spaces around header names and values are dropped.

    Returns one row per record, the columns named by the header (an empty header name becomes
    "Unnamed: <0-based position>", as pandas names it), the index (named "line") the 1-based file
    line where each record starts, so a quoted value spanning lines does not shift later rows'
    numbers. Blank rows (every field empty or spaces, e.g. a spreadsheet's ",,,,") are skipped;
    `attrs["blank_lines"]` lists the lines of those holding separators (empty lines are skipped
    silently). A row shorter than the header is padded with blanks.

    Raises TableError (one line) when the file is not UTF-8 or not parseable CSV, a row has more
    non-blank fields than the header, or two header names are one name after stripping spaces,
    Unicode NFKC normalisation and case folding (`validation.normalise_id`; code
    "duplicate_column", naming the column and its positions, since any reader would silently use
    only one of them); OSError when it cannot be opened."""
    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    blank: list[int] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        start = 1  # the file line the next record starts on
        try:
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields or all(not f.strip() for f in fields):
                    if fields:
                        blank.append(line)
                    continue
                if header is None:
                    header, header_line = [f.strip() for f in fields], line
                    continue
                if len(fields) > len(header):
                    if any(f.strip() for f in fields[len(header):]):
                        raise TableError([("unreadable_table", f"line {line} has {len(fields)} fields, the header "
                                           f"(line {header_line}) has {len(header)}", None)])
                    fields = fields[:len(header)]  # trailing empty fields (a trailing comma)
                rows.append([f.strip() for f in fields] + [""] * (len(header) - len(fields)))
                lines.append(line)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TableError([("unreadable_table", f"cannot parse CSV (line {start}: {exc})", None)]) from None
    if header is None:
        raise TableError([("unreadable_table", "cannot parse CSV (the file holds no header line)", None)])
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    _refuse_duplicate_names(header, header_line)
    frame = pd.DataFrame(rows, columns=names, index=pd.Index(lines, name="line", dtype="int64"), dtype=object)
    frame.attrs["blank_lines"] = blank
    return frame


def _refuse_duplicate_names(header: list[str], line: int) -> None:
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(header):
        if name:  # empty names (trailing commas) are "Unnamed: <i>", distinct
            positions.setdefault(normalise_id(name), []).append(i)
    problems = []
    for where in (w for w in positions.values() if len(w) > 1):
        fields = _and([str(i + 1) for i in where])
        if len({header[i] for i in where}) == 1:
            what = f"column {header[where[0]]!r} appears {len(where)} times in the header"
        else:
            what = f"columns {_and([repr(header[i]) for i in where])} are one name (ignoring case) in the header"
        problems.append(("duplicate_column", f"{what} (fields {fields} of line {line}); rename or remove all but "
                                             "one", header[where[0]]))
    if problems:
        raise TableError(problems)


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}"


def blank_rows_note(table: pd.DataFrame) -> str:
    """'skipped N blank row(s) (line(s) ...)' for a table read by `read_text_csv`."""
    lines = table.attrs["blank_lines"]
    shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
    return f"skipped {len(lines)} blank row(s) of separators only (line{'s' if len(lines) > 1 else ''} {shown})"


def _require_columns(df: pd.DataFrame, columns: list[str], file: str, report: ValidationReport) -> list[str]:
    """The missing ones among `columns`, each reported."""
    missing = [c for c in columns if c not in df.columns]
    for c in missing:
        report.add("missing_column", f"required column is missing (columns: {list(df.columns)})",
                   file=file, column=c)
    return missing


def _finish(rows: list[dict], spec: DatasetSpec, unchecked: Iterable[str] = (),
            ignored_rows: dict[str, int] | None = None) -> pd.DataFrame:
    """Records frame; `unchecked` fields had no column to read (already reported), so validation
    skips their values instead of reporting every patient as missing them. ignored_rows: split ->
    rows dropped for an ignored label."""
    records = pd.DataFrame(rows) if rows else _empty_records(spec)
    records.attrs["unchecked_fields"] = set(unchecked)
    records.attrs["ignored_rows"] = dict(ignored_rows or {})
    return records


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _empty_records(spec: DatasetSpec) -> pd.DataFrame:
    cols = ["patient_id", "label_name", "split", "origin"] + [f"path_{m.name}" for m in spec.modalities]
    return pd.DataFrame(columns=cols + [f.name for f in spec.fields], dtype=object)


def _field_values(row: pd.Series | None, spec: DatasetSpec) -> dict[str, str | None]:
    return {f.name: (row[f.name] if row is not None and f.name in row.index else None) for f in spec.fields}


# --- MEN: <root>/<train|test>/<class>/<patient>/<modality file> + clinical CSV -------------------

def read_men(root: Path, spec: DatasetSpec, report: ValidationReport, **_: object) -> pd.DataFrame:
    nameless = [m.name for m in spec.modalities if not m.file]
    if nameless:
        raise ConfigError(f"dataset {spec.name}: modalities {nameless} need a `file` name for the MEN folder layout")
    table_path = root / (spec.source.table or "clinical.csv")
    table_rel = _rel(table_path, root)
    table = read_table(table_path, root, report)
    id_col = spec.source.id_column
    by_id: dict[str, pd.Series] = {}
    unchecked = {f.name for f in spec.fields}
    if table is not None:
        unchecked = set(_require_columns(table, [id_col] + [f.name for f in spec.fields], table_rel, report))
        if id_col in table.columns:
            for line, row in table.iterrows():
                pid = row[id_col]
                if pid in by_id:
                    report.add("duplicate_id", f"patient id appears more than once in the table (again on line "
                               f"{line})", patient=pid, file=table_rel)
                else:
                    by_id[pid] = row

    rows = []
    split_dirs = [d for d in ("train", "test") if (root / d).is_dir()]
    if not split_dirs:
        report.add("missing_folder", "neither train/ nor test/ exists", file=str(root))
    for split_dir in split_dirs:
        for class_dir in sorted(p for p in (root / split_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
            for patient_dir in sorted(p for p in class_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                pid = patient_dir.name
                origin = f"{split_dir}/{class_dir.name}/{pid}"
                if table is not None and id_col in table.columns and pid not in by_id:
                    report.add("no_table_row", f"images at {origin}/ have no row in {table_rel}", patient=pid)
                    continue
                rows.append({"patient_id": pid, "label_name": class_dir.name,
                             "split": "dev" if split_dir == "train" else "test", "origin": origin,
                             **{f"path_{m.name}": f"{origin}/{m.file}" for m in spec.modalities},
                             **_field_values(by_id.get(pid), spec)})
    seen = {r["patient_id"] for r in rows}
    for pid in by_id:
        if pid not in seen and split_dirs:
            where = " or ".join(f"{d}/<class>/" for d in split_dirs)
            report.add("no_images", f"patient is in {table_rel} but has no image folder under {where}",
                       patient=pid, file=table_rel)
    return _finish(rows, spec, unchecked)


# --- Derm7pt release: meta/meta.csv + meta/{train,valid,test}_indexes.csv + images/ ------------

def read_derm7pt(root: Path, spec: DatasetSpec, report: ValidationReport, **_: object) -> pd.DataFrame:
    meta_path = root / (spec.source.table or "meta/meta.csv")
    meta_rel = _rel(meta_path, root)
    meta = read_table(meta_path, root, report)
    if meta is None:
        return _empty_records(spec)
    id_col = spec.source.id_column
    path_cols = [m.column or m.name for m in spec.modalities]
    if _require_columns(meta, [id_col, spec.label] + path_cols, meta_rel, report):
        return _empty_records(spec)
    unchecked = _require_columns(meta, [f.name for f in spec.fields], meta_rel, report)

    split_of = _derm7pt_splits(meta_path.parent, len(meta), root, report)
    rows = []
    ignored: dict[str, int] = {}
    for i, (line, row) in enumerate(meta.iterrows()):  # i: the 0-based row number the index files use
        raw = row[spec.label]
        pid = row[id_col]
        cls = spec.class_of(raw)
        if cls is None and raw in spec.source.ignored_labels:
            ignored[split_of.get(i, "")] = ignored.get(split_of.get(i, ""), 0) + 1
            continue  # a diagnosis outside this task
        if i not in split_of:
            if split_of:  # (no split files at all was reported already)
                report.add("bad_split", f"case (row {i} of {meta_rel}, line {line}) is in none of the split files",
                           patient=pid)
            continue
        rows.append({"patient_id": pid, "label_name": cls if cls is not None else raw,
                     "split": split_of[i], "origin": f"{meta_rel} row {i} (line {line})",
                     **{f"path_{m.name}": _join(spec.source.image_dir, row[c])
                        for m, c in zip(spec.modalities, path_cols)},
                     **_field_values(row, spec)})

    # images without a table row: files under the image folder that no meta row references
    image_dir = root / spec.source.image_dir
    if image_dir.is_dir():
        referenced = {posixpath.normpath(_join(spec.source.image_dir, v)) for c in path_cols for v in meta[c]}
        for p in sorted(image_dir.rglob("*")):
            if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and _rel(p, root) not in referenced:
                report.add("no_table_row", f"image is not referenced by any row of {meta_rel}", file=_rel(p, root))
    return _finish(rows, spec, unchecked, ignored)


def _derm7pt_splits(meta_dir: Path, n_rows: int, root: Path, report: ValidationReport) -> dict[int, str]:
    """Row index -> "dev" (train, valid) or "test", from the release's index files."""
    split_of: dict[int, str] = {}
    first_file: dict[int, str] = {}
    for name, split in (("train", "dev"), ("valid", "dev"), ("test", "test")):
        path = meta_dir / f"{name}_indexes.csv"
        rel = _rel(path, root)
        table = read_table(path, root, report)
        if table is None or _require_columns(table, ["indexes"], rel, report):
            continue
        for line, value in table["indexes"].items():
            try:
                idx = int(value)
            except ValueError:
                report.add("bad_split", f"line {line}: index {value!r} is not an integer", file=rel, column="indexes")
                continue
            if not 0 <= idx < n_rows:
                report.add("bad_split", f"line {line}: index {idx} is outside the {n_rows} rows of meta.csv",
                           file=rel, column="indexes")
            elif idx in first_file:
                report.add("bad_split", f"line {line}: meta.csv row {idx} is already listed in {first_file[idx]}",
                           file=rel, column="indexes")
            else:
                split_of[idx], first_file[idx] = split, rel
    return split_of


def _join(folder: str, rel: str) -> str:
    return posixpath.join(folder, rel) if folder and rel else rel


# --- generic manifest: any CSV + a dataset YAML ---------------------------------------------------

def read_manifest(root: Path, spec: DatasetSpec, report: ValidationReport, *, csv: Path | None = None,
                  seed: int = 0, **_: object) -> pd.DataFrame:
    """One row per patient: id, label, one path column per modality (relative to `root`, or to
    source.image_dir), the clinical fields and optionally a split column (dev/train/valid/test).
    Without a split column a seeded stratified hold-out of source.test_fraction becomes the test."""
    csv_path = Path(csv) if csv else root / (spec.source.table or "manifest.csv")
    csv_rel = _rel(csv_path, root)
    table = read_table(csv_path, root, report)
    if table is None:
        return _empty_records(spec)
    id_col = spec.source.id_column
    path_cols = [m.column or f"path_{m.name}" for m in spec.modalities]
    split_col = spec.source.split_column or ("split" if "split" in table.columns else "")
    required = [id_col, spec.label] + path_cols + ([split_col] if split_col else [])
    if _require_columns(table, required, csv_rel, report):
        return _empty_records(spec)
    unchecked = _require_columns(table, [f.name for f in spec.fields], csv_rel, report)

    rows = []
    ignored: dict[str, int] = {}
    for line, row in table.iterrows():
        pid, raw = row[id_col], row[spec.label]
        cls = spec.class_of(raw)
        if cls is None and raw in spec.source.ignored_labels:
            value = row[split_col].lower() if split_col else ""
            split = "" if not split_col else "test" if value == "test" else "dev" if value in DEV_SPLITS else ""
            ignored[split] = ignored.get(split, 0) + 1
            continue
        split = "dev"
        if split_col:
            value = row[split_col].lower()
            if value not in DEV_SPLITS | {"test"}:
                report.add("bad_split", f"split {row[split_col]!r} (line {line}) is not one of "
                           "dev/train/valid/test", patient=pid, column=split_col, file=csv_rel)
            split = "test" if value == "test" else "dev"
        rows.append({"patient_id": pid, "label_name": cls if cls is not None else raw, "split": split,
                     "origin": f"{csv_rel} line {line}",
                     **{f"path_{m.name}": _join(spec.source.image_dir, row[c])
                        for m, c in zip(spec.modalities, path_cols)},
                     **_field_values(row, spec)})
    records = _finish(rows, spec, unchecked, ignored)
    if not split_col and not records.empty:
        records["split"] = holdout_split(records["patient_id"], records["label_name"],
                                         spec.source.test_fraction, seed)
    return records


def holdout_split(ids: pd.Series, labels: pd.Series, test_fraction: float, seed: int) -> list[str]:
    """Seeded stratified hold-out: in each class (ids sorted, then shuffled by the seed) the first
    round(n * test_fraction) patients are "test", at least one patient per class stays "dev"."""
    rng = np.random.default_rng(seed)
    split = pd.Series("dev", index=ids.index, dtype=object)
    for label in sorted(labels.unique()):
        members = ids[labels == label].sort_values()
        order = members.index.to_numpy()[rng.permutation(len(members))]
        n_test = min(int(round(len(members) * test_fraction)), len(members) - 1)
        split.loc[order[:n_test]] = "test"
    return split.tolist()


ADAPTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "men": read_men,
    "derm7pt": read_derm7pt,
    "manifest": read_manifest,
}
