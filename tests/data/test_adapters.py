"""The one CSV reader (adapters.read_text_csv) and the tables of every layout read through it:
duplicate header names refused naming the column, blank rows skipped with a note naming their
lines, and every message numbering records by the file line they start on. Real CSV files on disk,
real synthetic datasets prepared end to end."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cfcml.config import PROJECT_ROOT
from cfcml.data.adapters import TableError, read_text_csv
from cfcml.data.prepare import prepare_dataset
from cfcml.data.validation import DatasetValidationError

MEN_SIZE, DERM_SIZE, FOLDS = (12, 12, 6), (16, 16), 3  # as in conftest.py


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


# --- the reader ----------------------------------------------------------------------------------

@pytest.mark.parametrize("header, column, words", [
    ("id,age,sex,age", "age", "column 'age' appears 2 times in the header (fields 2 and 4 of line 1)"),
    ("id,age,sex, age ", "age", "column 'age' appears 2 times in the header (fields 2 and 4 of line 1)"),
    ("id,Age,sex,age", "Age", "columns 'Age' and 'age' are one name (ignoring case) in the header (fields 2 and 4"),
    ("id,age,AGE,ａｇｅ", "age", "columns 'age', 'AGE' and 'ａｇｅ' are one name (ignoring case) in the header "
                             "(fields 2, 3 and 4"),
])
def test_a_header_naming_one_column_twice_is_refused_naming_the_column(tmp_path, header, column, words) -> None:
    path = write(tmp_path / "t.csv", f"{header}\n1,2,3,4\n")
    with pytest.raises(TableError) as info:
        read_text_csv(path)
    assert str(info.value).startswith(words) and str(info.value).endswith("; rename or remove all but one")
    assert info.value.problems == [("duplicate_column", str(info.value), column)]


def test_every_duplicated_column_is_named(tmp_path) -> None:
    path = write(tmp_path / "t.csv", "id,age,sex,age,sex\n1,2,3,4,5\n")
    with pytest.raises(TableError) as info:
        read_text_csv(path)
    assert [(code, column) for code, _, column in info.value.problems] == [("duplicate_column", "age"),
                                                                         ("duplicate_column", "sex")]


def test_empty_header_names_of_trailing_commas_are_not_duplicates(tmp_path) -> None:
    frame = read_text_csv(write(tmp_path / "t.csv", "id,age,,\n1,2,,\n"))
    assert list(frame.columns) == ["id", "age", "Unnamed: 2", "Unnamed: 3"]


@pytest.mark.parametrize("blank", [",,,", " , ,  ,", ",,", "\t,,,"])
def test_a_row_of_separators_only_is_skipped_and_its_line_noted(tmp_path, blank) -> None:
    path = write(tmp_path / "t.csv", f"id,age,sex,site\n1,50,F,a\n{blank}\n\n2,60,M,b\n{blank}\r\n")
    frame = read_text_csv(path)
    assert list(frame["id"]) == ["1", "2"] and list(frame.index) == [2, 5]
    assert frame.attrs["blank_lines"] == [3, 6]  # the empty line 4 is skipped without a note


def test_rows_are_numbered_by_the_file_line_they_start_on(tmp_path) -> None:
    path = write(tmp_path / "t.csv", 'id,note,age\n1,"two\nlines",50\n2,"three\n\nlines",60\n3,,70\n')
    frame = read_text_csv(path)
    assert list(frame.index) == [2, 4, 7] and frame.index.name == "line"
    assert frame.loc[4, "note"] == "three\n\nlines"


@pytest.mark.parametrize("text, words", [
    ("id,age\n1,50\n2,60,7\n", "line 3 has 3 fields, the header (line 1) has 2"),
    ('id,note\n1,"two\nlines"\n2,x,y\n', "line 4 has 3 fields, the header (line 1) has 2"),
    ("", "cannot parse CSV (the file holds no header line)"),
    (",,\n\n", "cannot parse CSV (the file holds no header line)"),
])
def test_a_table_that_cannot_be_read_is_one_line_naming_the_file_line(tmp_path, text, words) -> None:
    with pytest.raises(TableError, match=f"^{re.escape(words)}$"):
        read_text_csv(write(tmp_path / "t.csv", text))


def test_a_short_row_is_padded_with_blanks_and_trailing_empty_fields_are_dropped(tmp_path) -> None:
    frame = read_text_csv(write(tmp_path / "t.csv", "id,age,sex\n1,50\n2,60,M,,\n"))
    assert frame.to_dict("records") == [{"id": "1", "age": "50", "sex": ""}, {"id": "2", "age": "60", "sex": "M"}]


# --- every layout's tables go through it ---------------------------------------------------------

def add_column(path: Path, name: str, value: str = "x") -> None:
    """A column appended to a CSV as text: header `name`, every row `value`."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([f"{lines[0]},{name}", *[f"{line},{value}" for line in lines[1:]]]) + "\n")


def manifest_spec(men_root: Path) -> Path:
    """MEN as a user's own `layout: manifest` dataset: cases.csv (one row per patient, its paths,
    a split column) and a dataset YAML."""
    spec = yaml.safe_load((PROJECT_ROOT / "conf" / "datasets" / "men.yaml").read_text())
    spec.update(name="my_men", label="grade",
                modalities=[{"name": n, "dims": 3, "channels": 1, "column": f"{n}_file"} for n in ("t1", "t2", "adc")],
                source={"layout": "manifest", "table": "cases.csv", "id_column": "subject"})
    (men_root / "my_men.yaml").write_text(yaml.safe_dump(spec))
    clinical = pd.read_csv(men_root / "clinical.csv", dtype=str, keep_default_na=False)
    rows = [{"subject": f.name, "grade": f.parent.name, "split": f.parent.parent.name,
             **{f"{n}_file": f"{f.relative_to(men_root).as_posix()}/{n}_bbox.nii.gz" for n in ("t1", "t2", "adc")}}
            for f in sorted(men_root.glob("*/*/*")) if f.is_dir()]
    cases = pd.DataFrame(rows).merge(clinical.rename(columns={"patient_id": "subject"}), on="subject")
    cases.to_csv(men_root / "cases.csv", index=False)
    return men_root / "my_men.yaml"


def prepare(layout: str, root: Path, out: Path):
    if layout == "manifest":
        return prepare_dataset(str(root / "my_men.yaml"), root, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    return prepare_dataset(layout, root, out, folds=FOLDS, image_size=MEN_SIZE if layout == "men" else DERM_SIZE,
                           workers=2)


@pytest.fixture(params=["men", "derm7pt", "manifest"])
def layout(request, men_root, derm_root) -> tuple[str, Path, Path]:
    """(layout, dataset root, its main table) for each layout."""
    if request.param == "men":
        return "men", men_root, men_root / "clinical.csv"
    if request.param == "derm7pt":
        return "derm7pt", derm_root, derm_root / "meta" / "meta.csv"
    manifest_spec(men_root)
    return "manifest", men_root, men_root / "cases.csv"


@pytest.mark.parametrize("spell", [str, str.upper, lambda name: f" {name} "], ids=["same", "upper case", "spaces"])
def test_prepare_refuses_a_table_naming_a_column_twice(layout, tmp_path, spell) -> None:
    name, root, table = layout
    column = "age" if name != "derm7pt" else "sex"
    add_column(table, spell(column))
    with pytest.raises(DatasetValidationError) as info:
        prepare(name, root, tmp_path / "out")
    (problem,) = [p for p in info.value.report.problems if p.code == "duplicate_column"]
    assert problem.column == column and problem.file == table.relative_to(root).as_posix()
    assert f"[duplicate_column] column '{column}', file {problem.file}: " in str(info.value)
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_a_derm7pt_split_file_naming_its_column_twice(derm_root, tmp_path) -> None:
    add_column(derm_root / "meta" / "valid_indexes.csv", "indexes", "0")
    with pytest.raises(DatasetValidationError) as info:
        prepare("derm7pt", derm_root, tmp_path / "out")
    assert any(p.code == "duplicate_column" and p.column == "indexes" and p.file == "meta/valid_indexes.csv"
               for p in info.value.report.problems)


def test_prepare_skips_blank_rows_with_a_warning_naming_their_lines(layout, tmp_path) -> None:
    name, root, table = layout
    lines = table.read_text().splitlines()
    blank = "," * (lines[0].count(","))
    table.write_text("\n".join([*lines[:3], blank, *lines[3:], " , ", ""]) + "\n")
    prepared = prepare(name, root, tmp_path / "out")
    assert "" not in set(prepared.manifest["patient_id"])
    rel = table.relative_to(root).as_posix()
    assert (f"[blank_rows] file {rel}: skipped 2 blank row(s) of separators only (lines 4, "
            f"{len(lines) + 2})") in prepared.info["warnings"]


def test_a_duplicate_id_after_a_value_spanning_lines_is_named_by_its_file_line(men_root, tmp_path) -> None:
    clinical = men_root / "clinical.csv"
    lines = clinical.read_text().splitlines()
    add_column(clinical, "note", '"seen twice:\nfirst visit"')  # every record now spans two lines
    text = clinical.read_text()
    clinical.write_text(text + lines[1] + ',"again"\n')  # record n+1 starts on line 2n+2
    with pytest.raises(DatasetValidationError) as info:
        prepare("men", men_root, tmp_path / "out")
    pid = lines[1].split(",")[0]
    assert (f"[duplicate_id] patient {pid!r}, file clinical.csv: patient id appears more than once in the table "
            f"(again on line {2 * len(lines)})") in str(info.value)


def test_a_bad_manifest_split_after_a_value_spanning_lines_is_named_by_its_file_line(men_root, tmp_path) -> None:
    manifest_spec(men_root)
    cases = pd.read_csv(men_root / "cases.csv", dtype=str, keep_default_na=False)
    cases["note"] = ""
    cases.loc[0, "note"] = "line one\nline two\nline three"
    cases.loc[3, "split"] = "holdout"
    cases.to_csv(men_root / "cases.csv", index=False)
    with pytest.raises(DatasetValidationError) as info:
        prepare("manifest", men_root, tmp_path / "out")
    assert (f"[bad_split] patient {cases.loc[3, 'subject']!r}, column 'split', file cases.csv: split 'holdout' "
            "(line 7) is not one of dev/train/valid/test") in str(info.value)  # header, 3 lines, 2 rows, then it
