"""One test per validation case: the report names the culprit, and no manifest is written."""
from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from crafted_images import PNG_GREY, PNG_RGB, nifti_header_only, png_header_only
from PIL import Image

from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import MEN_SPACING
from cfcml.data.validation import DatasetValidationError, ValidationReport

MEN_SIZE, DERM_SIZE, FOLDS = (12, 12, 6), (16, 16), 3  # as in conftest.py


def patient_dir(root: Path, cls: str = "Grade_1", split: str = "train", i: int = 0) -> Path:
    return sorted(p for p in (root / split / cls).iterdir() if p.is_dir())[i]


def edit_csv(path: Path, fn: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def expect_problems(dataset: str, root: Path, out: Path, expected: list[tuple[str, str]], **kw) -> ValidationReport:
    """prepare fails; every (code, culprit) pair is one problem whose text names the culprit."""
    size = MEN_SIZE if dataset == "men" else DERM_SIZE
    kw.setdefault("folds", FOLDS)
    with pytest.raises(DatasetValidationError) as info:
        prepare_dataset(dataset, root, out, image_size=size, workers=2, **kw)
    report = info.value.report
    text = str(info.value)
    for code, culprit in expected:
        assert any(p.code == code and culprit in p.render() for p in report.problems), \
            f"no [{code}] problem naming {culprit!r} in:\n{text}"
        assert culprit in text
    assert not (out / "manifest.parquet").exists() and not out.exists(), "nothing may be written"
    return report


# --- MEN: images ----------------------------------------------------------------------------------

def test_missing_modality_file(men_root: Path, tmp_path: Path) -> None:
    p = patient_dir(men_root)
    (p / "t2_bbox.nii.gz").unlink()
    report = expect_problems("men", men_root, tmp_path / "out", [("missing_file", p.name), ("missing_file", "t2_bbox")])
    assert len(report.problems) == 1


def test_unreadable_image(men_root: Path, tmp_path: Path) -> None:
    p = patient_dir(men_root)
    (p / "t1_bbox.nii.gz").write_bytes(b"this is not a NIfTI volume" * 20)
    expect_problems("men", men_root, tmp_path / "out", [("unreadable_image", f"{p.name}/t1_bbox.nii.gz")])


def test_truncated_image(men_root: Path, tmp_path: Path) -> None:
    f = patient_dir(men_root, "Grade_2_invasion") / "adc_bbox.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    expect_problems("men", men_root, tmp_path / "out", [("truncated_image", f"{f.parent.name}/adc_bbox.nii.gz")])


def test_empty_image(men_root: Path, tmp_path: Path) -> None:
    f = patient_dir(men_root) / "t1_bbox.nii.gz"
    f.write_bytes(b"")
    expect_problems("men", men_root, tmp_path / "out", [("empty_image", f"{f.parent.name}/t1_bbox.nii.gz")])


def test_all_zero_volume(men_root: Path, tmp_path: Path) -> None:
    f = patient_dir(men_root, "Grade_2_noninvasion") / "t2_bbox.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.int16), np.eye(4)), f)
    expect_problems("men", men_root, tmp_path / "out", [("empty_image", f"{f.parent.name}/t2_bbox.nii.gz")])


def test_wrong_dimensionality(men_root: Path, tmp_path: Path) -> None:
    f = patient_dir(men_root) / "t2_bbox.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.int16), np.eye(4)), f)
    report = expect_problems("men", men_root, tmp_path / "out", [("wrong_dims", f"{f.parent.name}/t2_bbox.nii.gz")])
    assert "2 dimensions" in report.render()


def test_wrong_channel_count(men_root: Path, tmp_path: Path) -> None:
    f = patient_dir(men_root) / "adc_bbox.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 6, 2), np.int16), np.eye(4)), f)
    report = expect_problems("men", men_root, tmp_path / "out",
                             [("wrong_channels", f"{f.parent.name}/adc_bbox.nii.gz")])
    assert "2 channel(s)" in report.render()


def test_nan_voxels(men_root: Path, tmp_path: Path) -> None:
    f = patient_dir(men_root) / "t1_bbox.nii.gz"
    vol = np.ones((16, 16, 6), np.float32)
    vol[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), f)
    expect_problems("men", men_root, tmp_path / "out", [("bad_values", f"{f.parent.name}/t1_bbox.nii.gz")])


def test_path_escaping_the_root(men_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.nii.gz"
    f = patient_dir(men_root) / "t1_bbox.nii.gz"
    shutil.copy(f, outside)
    f.unlink()
    os.symlink(outside, f)  # a readable file, but outside the dataset
    expect_problems("men", men_root, tmp_path / "out", [("path_escape", f"{f.parent.name}/t1_bbox.nii.gz")])


# --- MEN: table and folders ----------------------------------------------------------------------

def test_table_row_without_images(men_root: Path, tmp_path: Path) -> None:
    edit_csv(men_root / "clinical.csv", lambda df: pd.concat([df, df.iloc[[0]].assign(patient_id="MEN_9999")]))
    expect_problems("men", men_root, tmp_path / "out", [("no_images", "MEN_9999")])


def test_images_without_table_row(men_root: Path, tmp_path: Path) -> None:
    pid = patient_dir(men_root, "Grade_2_noninvasion").name
    edit_csv(men_root / "clinical.csv", lambda df: df[df["patient_id"] != pid])
    expect_problems("men", men_root, tmp_path / "out", [("no_table_row", pid)])


def test_duplicate_id_in_table(men_root: Path, tmp_path: Path) -> None:
    pid = patient_dir(men_root).name
    edit_csv(men_root / "clinical.csv", lambda df: pd.concat([df, df[df["patient_id"] == pid]]))
    expect_problems("men", men_root, tmp_path / "out", [("duplicate_id", pid)])


def test_duplicate_id_in_folders(men_root: Path, tmp_path: Path) -> None:
    p = patient_dir(men_root)
    shutil.copytree(p, men_root / "test" / "Grade_2_invasion" / p.name)  # same patient twice
    report = expect_problems("men", men_root, tmp_path / "out", [("duplicate_id", p.name)])
    assert f"test/Grade_2_invasion/{p.name}" in report.render()


def test_label_folder_outside_class_list(men_root: Path, tmp_path: Path) -> None:
    p = patient_dir(men_root)
    (men_root / "train" / "Grade_3").mkdir()
    shutil.move(p, men_root / "train" / "Grade_3" / p.name)
    expect_problems("men", men_root, tmp_path / "out", [("unknown_label", "Grade_3"), ("unknown_label", p.name)])


def test_unknown_category_value(men_root: Path, tmp_path: Path) -> None:
    pid = patient_dir(men_root).name
    edit_csv(men_root / "clinical.csv",
             lambda df: df.assign(location=np.where(df["patient_id"] == pid, "7", df["location"])))
    report = expect_problems("men", men_root, tmp_path / "out",
                             [("unknown_category", pid), ("unknown_category", "location")])
    assert "'7'" in report.render()


@pytest.mark.parametrize("value", ["abc", "inf", "12,5"])
def test_non_numeric_value(men_root: Path, tmp_path: Path, value: str) -> None:
    pid = patient_dir(men_root, "Grade_2_invasion").name
    edit_csv(men_root / "clinical.csv", lambda df: df.assign(age=np.where(df["patient_id"] == pid, value, df["age"])))
    expect_problems("men", men_root, tmp_path / "out",
                    [("bad_numeric", pid), ("bad_numeric", "age"), ("bad_numeric", value)])


@pytest.mark.parametrize("value", ["", "NaN", "NA"])
def test_missing_value_in_required_field(men_root: Path, tmp_path: Path, value: str) -> None:
    pid = patient_dir(men_root).name
    edit_csv(men_root / "clinical.csv", lambda df: df.assign(age=np.where(df["patient_id"] == pid, value, df["age"])))
    expect_problems("men", men_root, tmp_path / "out", [("missing_value", pid), ("missing_value", "age")])


def test_missing_column(men_root: Path, tmp_path: Path) -> None:
    edit_csv(men_root / "clinical.csv", lambda df: df.drop(columns=["age"]))
    report = expect_problems("men", men_root, tmp_path / "out", [("missing_column", "age")])
    assert report.codes() == {"missing_column"}  # no per-patient noise about the absent column


def test_missing_table(men_root: Path, tmp_path: Path) -> None:
    (men_root / "clinical.csv").unlink()
    expect_problems("men", men_root, tmp_path / "out", [("missing_table", "clinical.csv")])


def test_empty_dataset(men_root: Path, tmp_path: Path) -> None:
    for split in ("train", "test"):
        shutil.rmtree(men_root / split)
        (men_root / split).mkdir()
    edit_csv(men_root / "clinical.csv", lambda df: df.iloc[:0])
    expect_problems("men", men_root, tmp_path / "out", [("empty_dataset", "no patients")])


def test_class_with_fewer_patients_than_folds(men_root: Path, tmp_path: Path) -> None:
    cls = men_root / "train" / "Grade_2_noninvasion"
    keep = sorted(cls.iterdir())[0]
    for p in sorted(cls.iterdir())[1:]:
        shutil.rmtree(p)
    edit_csv(men_root / "clinical.csv",
             lambda df: df[df["patient_id"].isin([d.name for d in (men_root / "train").glob("*/*")] +
                                                 [d.name for d in (men_root / "test").glob("*/*")])])
    assert keep.exists()
    expect_problems("men", men_root, tmp_path / "out", [("small_class", "Grade_2_noninvasion")])


def test_all_problems_are_reported_together(men_root: Path, tmp_path: Path) -> None:
    a, b = patient_dir(men_root, i=0), patient_dir(men_root, "Grade_2_invasion")
    (a / "t1_bbox.nii.gz").unlink()
    (b / "adc_bbox.nii.gz").write_bytes(b"")
    edit_csv(men_root / "clinical.csv", lambda df: df.assign(sex=np.where(df["patient_id"] == b.name, "2", df["sex"])))
    report = expect_problems("men", men_root, tmp_path / "out",
                             [("missing_file", a.name), ("empty_image", b.name), ("unknown_category", b.name)])
    assert len(report.problems) == 3


def test_failed_run_leaves_a_previous_prepare_intact(men_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_dataset("men", men_root, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    before = (out / "manifest.parquet").read_bytes()
    (patient_dir(men_root) / "t1_bbox.nii.gz").unlink()
    with pytest.raises(DatasetValidationError):
        prepare_dataset("men", men_root, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    assert (out / "manifest.parquet").read_bytes() == before


# --- Derm7pt -----------------------------------------------------------------------------------

def edit_meta(root: Path, fn: Callable[[pd.DataFrame], None]) -> pd.DataFrame:
    meta = pd.read_csv(root / "meta" / "meta.csv", dtype=str, keep_default_na=False)
    fn(meta)
    meta.to_csv(root / "meta" / "meta.csv", index=False)
    return meta


def task_row(root: Path, diagnosis_prefix: str = "melanoma") -> int:
    meta = pd.read_csv(root / "meta" / "meta.csv", dtype=str, keep_default_na=False)
    return int(meta.index[meta["diagnosis"].str.startswith(diagnosis_prefix)][0])


def test_derm_diagnosis_outside_class_list(derm_root: Path, tmp_path: Path) -> None:
    i = task_row(derm_root)
    meta = edit_meta(derm_root, lambda m: m.__setitem__("diagnosis", m["diagnosis"].where(m.index != i, "melanomma")))
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("unknown_label", "melanomma"),
                                                             ("unknown_label", meta.at[i, "case_num"])])


def test_derm_unknown_category_value(derm_root: Path, tmp_path: Path) -> None:
    i = task_row(derm_root, "clark")
    meta = edit_meta(derm_root, lambda m: m.__setitem__("elevation", m["elevation"].where(m.index != i, "bumpy")))
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("unknown_category", "bumpy"),
                                                             ("unknown_category", "elevation"),
                                                             ("unknown_category", meta.at[i, "case_num"])])


def test_derm_grayscale_photo_has_wrong_channel_count(derm_root: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(derm_root / "meta" / "meta.csv", dtype=str)
    rel = meta.at[task_row(derm_root), "derm"]
    path = derm_root / "images" / rel
    Image.open(path).convert("L").save(path, format="JPEG")
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("wrong_channels", rel)])


def test_derm_truncated_photo(derm_root: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(derm_root / "meta" / "meta.csv", dtype=str)
    rel = meta.at[task_row(derm_root, "clark"), "clinic"]
    path = derm_root / "images" / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("truncated_image", rel)])


def test_derm_missing_photo(derm_root: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(derm_root / "meta" / "meta.csv", dtype=str)
    i = task_row(derm_root)
    (derm_root / "images" / meta.at[i, "clinic"]).unlink()
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("missing_file", meta.at[i, "clinic"]),
                                                             ("missing_file", meta.at[i, "case_num"])])


def test_derm_image_without_table_row(derm_root: Path, tmp_path: Path) -> None:
    Image.new("RGB", (24, 24)).save(derm_root / "images" / "stray.jpg")
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("no_table_row", "images/stray.jpg")])


def test_derm_path_escaping_the_root(derm_root: Path, tmp_path: Path) -> None:
    Image.new("RGB", (24, 24)).save(tmp_path / "outside.jpg")
    i = task_row(derm_root)
    meta = edit_meta(derm_root, lambda m: m.__setitem__("clinic", m["clinic"].where(m.index != i, "../../outside.jpg")))
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("path_escape", "../../outside.jpg"),
                                                             ("path_escape", meta.at[i, "case_num"])])


def test_derm_duplicate_case_num(derm_root: Path, tmp_path: Path) -> None:
    a, b = task_row(derm_root, "clark"), task_row(derm_root, "melanoma")
    meta = edit_meta(derm_root,
                     lambda m: m.__setitem__("case_num", m["case_num"].where(m.index != b, m.at[a, "case_num"])))
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("duplicate_id", meta.at[a, "case_num"])])


def test_derm_bad_split_indexes(derm_root: Path, tmp_path: Path) -> None:
    test_idx = pd.read_csv(derm_root / "meta" / "test_indexes.csv")
    train = pd.read_csv(derm_root / "meta" / "train_indexes.csv")
    pd.concat([train, test_idx.iloc[[0]], pd.DataFrame({"indexes": [99999]})]).to_csv(
        derm_root / "meta" / "train_indexes.csv", index=False)
    report = expect_problems("derm7pt", derm_root, tmp_path / "out",
                             [("bad_split", "99999"), ("bad_split", "already listed")])
    assert all(p.file and "indexes.csv" in p.file for p in report.problems)


# --- geometry: one canonical orientation, one voxel grid per patient -----------------------------

MEN_AFFINE = np.diag([*MEN_SPACING, 1.0])


def rewrite(f: Path, fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    img = nib.load(f)
    vol, affine = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), affine), f)


def flipped(axis: int):
    def fn(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        affine[axis, 3] += (vol.shape[axis] - 1) * affine[axis, axis]
        affine[axis, axis] *= -1
        return np.flip(vol, axis=axis), affine
    return fn


@pytest.mark.parametrize("axis", [0, 2])
def test_a_modality_stored_with_a_flipped_affine_is_cached_like_the_unflipped_one(
        men_root: Path, men_prepared, tmp_path: Path, axis: int) -> None:
    p = patient_dir(men_root, "Grade_2_invasion")
    rewrite(p / "t2_bbox.nii.gz", flipped(axis))
    assert not np.array_equal(np.asarray(nib.load(p / "t2_bbox.nii.gz").dataobj),
                              np.asarray(nib.load(men_prepared.root / "train" / "Grade_2_invasion" / p.name
                                                  / "t2_bbox.nii.gz").dataobj))  # the voxels are stored mirrored
    prepared = prepare_dataset("men", men_root, tmp_path / "out", folds=FOLDS, image_size=MEN_SIZE, workers=2)
    for m in ("t1", "t2", "adc"):
        np.testing.assert_array_equal(np.load(prepared.cache_path(p.name, m)),
                                      np.load(men_prepared.cache_path(p.name, m)))


@pytest.mark.parametrize("change, words", [
    (lambda v, a: (v[:, :, :-1], a), "shape"),
    (lambda v, a: (v, a @ np.diag([1.0, 1.0, 2.0, 1.0])), "voxel spacing"),
    (lambda v, a: (v, a + np.array([[0, 0, 0, 3.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])), "origin"),
])
def test_modalities_of_one_patient_on_different_grids_are_refused(men_root: Path, tmp_path: Path, change,
                                                                   words: str) -> None:
    p = patient_dir(men_root, "Grade_1", i=1)
    rewrite(p / "adc_bbox.nii.gz", change)
    report = expect_problems("men", men_root, tmp_path / "out",
                             [("geometry_mismatch", p.name), ("geometry_mismatch", f"{p.name}/adc_bbox.nii.gz"),
                              ("geometry_mismatch", words)])
    assert len(report.problems) == 1


# --- identity: one patient, one split ---------------------------------------------------------------

@pytest.mark.parametrize("variant", [str.lower, str.title, lambda s: unicodedata.normalize("NFKC", s).translate(
    {ord(c): ord(c) + 0xFEE0 for c in "MEN"}), lambda s: s.replace("_", "\uff3f")])
def test_one_patient_under_two_spellings_of_its_id_is_refused(men_root: Path, tmp_path: Path, variant) -> None:
    p = patient_dir(men_root, "Grade_1")
    other = patient_dir(men_root, "Grade_2_invasion")  # other images: only the id gives it away
    twin = variant(p.name)
    assert twin != p.name
    shutil.copytree(other, men_root / "test" / "Grade_1" / twin)
    shutil.rmtree(other)  # (so that its images serve one patient only)
    edit_csv(men_root / "clinical.csv", lambda df: pd.concat([df[df["patient_id"] != other.name],
                                                              df[df["patient_id"] == p.name].assign(patient_id=twin)]))
    report = expect_problems("men", men_root, tmp_path / "out", [("duplicate_id", p.name), ("duplicate_id", twin),
                                                                 ("duplicate_id", "(test)"), ("duplicate_id", "(dev)")])
    assert report.codes() == {"duplicate_id"}


@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_one_image_file_serving_two_patients_is_refused(men_root: Path, tmp_path: Path, how: str) -> None:
    a = patient_dir(men_root, "Grade_1")
    b = sorted(p for p in (men_root / "test" / "Grade_2_invasion").iterdir())[0]
    for name in ("t1_bbox.nii.gz", "t2_bbox.nii.gz", "adc_bbox.nii.gz"):  # (all three: one voxel grid)
        (b / name).unlink()
        if how == "symlink":  # the same file by path
            os.symlink(Path("..") / ".." / ".." / "train" / "Grade_1" / a.name / name, b / name)
        else:  # the same file by content
            shutil.copy(a / name, b / name)
    report = expect_problems("men", men_root, tmp_path / "out",
                             [("shared_image", f"{a.name!r} (dev)"), ("shared_image", f"{b.name!r} (test)"),
                              ("shared_image", "t1_bbox.nii.gz"), ("shared_image", "adc_bbox.nii.gz")])
    assert report.codes() == {"shared_image"} and len(report.problems) == 3


# --- degenerate content -----------------------------------------------------------------------------

@pytest.mark.parametrize("fill, code, words", [
    (lambda v: np.full_like(v, 417), "constant_image", "every non-zero voxel is 417"),
    (lambda v: np.where(v != 0, 1, 0).astype(v.dtype), "constant_image", "every non-zero voxel is 1"),
    (lambda v: np.where(v != 0, v + 3000, 0).astype(v.dtype), "constant_image", "after the clip window [0.0, 1200.0]"),
    (lambda v: np.zeros_like(v), "empty_image", "every voxel is 0"),
])
def test_a_volume_with_nothing_to_normalise_is_refused(men_root: Path, tmp_path: Path, fill, code, words) -> None:
    f = patient_dir(men_root, "Grade_2_noninvasion") / "t1_bbox.nii.gz"
    rewrite(f, lambda v, a: (fill(v), a))
    report = expect_problems("men", men_root, tmp_path / "out", [(code, f"{f.parent.name}/t1_bbox.nii.gz"),
                                                                 (code, words)])
    assert len(report.problems) == 1


def test_a_photo_of_one_colour_is_refused(derm_root: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(derm_root / "meta" / "meta.csv", dtype=str)
    rel = meta.at[task_row(derm_root), "clinic"]
    Image.new("RGB", (24, 24), (180, 120, 90)).save(derm_root / "images" / rel, format="JPEG")
    expect_problems("derm7pt", derm_root, tmp_path / "out", [("constant_image", rel), ("constant_image", "one colour")])


def test_a_volume_saturated_by_the_clip_window_is_warned_with_the_share(men_root: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from pipelines.prepare import main

    f = patient_dir(men_root, "Grade_1") / "t2_bbox.nii.gz"
    # tissue scaled so that about 70% of it lies above the window's 1200
    rewrite(f, lambda v, a: ((v * (1200 / np.percentile(v[v != 0], 30))).astype(np.float32), a))
    vol = np.asarray(nib.load(f).dataobj)
    share = (vol > 1200).sum() / (vol != 0).sum()
    assert 0.5 < share < 1
    assert main(["--dataset", "men", "--data-root", str(men_root), "--out", str(tmp_path / "out"), "--folds", "3",
                 "--image-size", *map(str, MEN_SIZE)]) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1
    assert f"{f.parent.name}/t2_bbox.nii.gz" in warned[0] and f"{share:.0%} of the non-zero voxels" in warned[0]
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert len(info["warnings"]) == 1 and warned[0] == f"warning: {info['warnings'][0]}"


# --- command line --------------------------------------------------------------------------------

def test_cli_exits_nonzero_with_the_full_report(men_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.prepare import main

    p = patient_dir(men_root)
    (p / "t2_bbox.nii.gz").unlink()
    edit_csv(men_root / "clinical.csv",
             lambda df: df.assign(age=np.where(df["patient_id"] == p.name, "old", df["age"])))
    out = tmp_path / "out"
    code = main(["--dataset", "men", "--root", str(men_root), "--out", str(out), "--folds", "3",
                 "--image-size", *map(str, MEN_SIZE)])
    err = capsys.readouterr().err
    assert code == 1
    assert "2 problem(s)" in err and "missing_file" in err and "'old'" in err and p.name in err
    assert not out.exists()


# --- two orientation fields: refused when they disagree on the orientation --------------------------

def with_fields(f: Path, qform_of: Callable[[np.ndarray, tuple[int, ...]], np.ndarray], qcode: int = 1,
                scode: int = 1) -> None:
    """`f` saved again with its sform as it was and a qform made from it (and these codes)."""
    img = nib.load(f)
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    out.set_qform(qform_of(img.affine.copy(), img.shape), code=qcode)
    out.set_sform(img.affine, code=scode)
    nib.save(out, f)


def mirrored_lr(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    affine[0, 3] += (shape[0] - 1) * affine[0, 0]
    affine[:, 0] *= -1
    return affine


def mirrored_si(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    affine[2, 3] += (shape[2] - 1) * affine[2, 2]
    affine[:, 2] *= -1
    return affine


@pytest.mark.parametrize("qform_of, axes, qcode, scode", [(mirrored_lr, "LAS", 1, 1), (mirrored_lr, "LAS", 1, 2),
                                                           (mirrored_si, "RAI", 2, 1)])
def test_a_volume_whose_qform_and_sform_disagree_on_the_orientation_is_refused(men_root: Path, tmp_path: Path,
                                                                               qform_of, axes, qcode, scode) -> None:
    p = patient_dir(men_root, "Grade_2_invasion", i=1)
    with_fields(p / "adc_bbox.nii.gz", qform_of, qcode, scode)
    report = expect_problems("men", men_root, tmp_path / "out", [
        ("orientation_conflict", p.name), ("orientation_conflict", f"{p.name}/adc_bbox.nii.gz"),
        ("orientation_conflict", f"adc image: its qform (code {qcode}, "),
        ("orientation_conflict", f"says {axes} but its sform (code {scode}, ")])
    assert len(report.problems) == 1


def test_a_qform_off_the_sform_but_of_its_orientation_is_warned_and_the_sform_used(men_root: Path, men_prepared,
                                                                                   tmp_path: Path) -> None:
    p = patient_dir(men_root, "Grade_1", i=2)
    shifted = lambda a, shape: a + np.pad([[0, 0, 0, 10.0]], ((0, 3), (0, 0)))  # noqa: E731
    with_fields(p / "t1_bbox.nii.gz", shifted, 1, 2)
    prepared = prepare_dataset("men", men_root, tmp_path / "out", folds=FOLDS, image_size=MEN_SIZE, workers=2)
    warned = [w for w in prepared.info["warnings"] if w.startswith("[qform_sform_differ]")]
    assert len(warned) == 1 and f"patient {p.name!r}" in warned[0] and f"{p.name}/t1_bbox.nii.gz" in warned[0]
    assert "qform (code 1, scanner) and sform (code 2, aligned) agree on the orientation (RAS)" in warned[0]
    np.testing.assert_array_equal(np.load(prepared.cache_path(p.name, "t1")), np.load(men_prepared.cache_path(p.name,
                                                                                                              "t1")))


# --- decompression bombs: the size the header promises, checked before decompressing ----------------

def test_a_nifti_promising_gigabytes_is_refused_naming_patient_and_file(men_root: Path, tmp_path: Path) -> None:
    p = patient_dir(men_root, "Grade_2_noninvasion")
    nifti_header_only(p / "t2_bbox.nii.gz", (4096, 4096, 512), np.int16)  # 32 GiB as float32, 0.1 KB on disk
    report = expect_problems("men", men_root, tmp_path / "out", [
        ("image_too_large", p.name), ("image_too_large", f"{p.name}/t2_bbox.nii.gz"),
        ("image_too_large", "t2 image: the header promises shape [4096, 4096, 512] int16"),
        ("image_too_large", "over the limit of 512 MiB per image ($CFCML_MAX_IMAGE_BYTES)")])
    assert len(report.problems) == 1


@pytest.mark.parametrize("width, height, colour_type, words", [
    (14000, 14000, PNG_GREY, "Image size (196000000 pixels) exceeds limit"),  # Pillow's own limit
    (7000, 7000, PNG_RGB, "7000x7000 pixels of 3 band(s)"),  # ours, under Pillow's
])
def test_a_photo_promising_gigabytes_is_refused_naming_case_and_file(derm_root: Path, tmp_path: Path, width: int,
                                                                     height: int, colour_type: int, words: str) -> None:
    meta = pd.read_csv(derm_root / "meta" / "meta.csv", dtype=str)
    i = task_row(derm_root, "clark")
    rel = meta.at[i, "derm"]
    png_header_only(derm_root / "images" / rel, width, height, colour_type)  # PNG bytes under its .jpg name
    report = expect_problems("derm7pt", derm_root, tmp_path / "out", [
        ("image_too_large", rel), ("image_too_large", meta.at[i, "case_num"]), ("image_too_large", words),
        ("image_too_large", "refused before decompressing")])
    assert len(report.problems) == 1 and "\n" not in report.problems[0].render()


def test_a_bad_size_limit_is_one_line_before_any_image_is_read(men_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFCML_MAX_IMAGE_BYTES", "plenty")
    with pytest.raises(ValueError, match=r"^\$CFCML_MAX_IMAGE_BYTES='plenty' is not a size"):
        prepare_dataset("men", men_root, tmp_path / "out", folds=FOLDS, image_size=MEN_SIZE, workers=2)


# --- splits: every part a search scores on holds patients ---------------------------------------------

def relabel(root: Path, split_file: str, diagnosis_prefix: str | None, to: str) -> None:
    """Every case of `split_file` (train/valid/test_indexes.csv) whose diagnosis starts with the
    prefix (None: every case) gets diagnosis `to`."""
    rows = set(pd.read_csv(root / "meta" / split_file)["indexes"])

    def fn(m: pd.DataFrame) -> None:
        hit = m.index.isin(rows) & (m["diagnosis"].str.startswith(diagnosis_prefix) if diagnosis_prefix else True)
        m.loc[hit, "diagnosis"] = to
    edit_meta(root, fn)


def ignored_in(root: Path, *split_files: str) -> int:
    """How many cases of these split files have a diagnosis derm7pt.yaml ignores."""
    ignored = set(yaml.safe_load(Path("conf/datasets/derm7pt.yaml").read_text())["source"]["ignored_labels"])
    rows = set().union(*(set(pd.read_csv(root / "meta" / f)["indexes"]) for f in split_files))
    meta = pd.read_csv(root / "meta" / "meta.csv", dtype=str, keep_default_na=False)
    return int((meta.index.isin(rows) & meta["diagnosis"].isin(ignored)).sum())


def test_label_filtering_that_leaves_no_test_patient_is_refused(derm_root: Path, tmp_path: Path) -> None:
    relabel(derm_root, "test_indexes.csv", None, "lentigo")  # an ignored diagnosis: every test case dropped
    n = ignored_in(derm_root, "test_indexes.csv")
    report = expect_problems("derm7pt", derm_root, tmp_path / "out", [
        ("empty_split", f"the test split has no patients after label filtering (source.ignored_labels dropped {n} "
                        f"of its rows): the final model could not be tested")])
    assert report.codes() == {"empty_split"}


def test_a_men_layout_without_test_patients_is_refused(men_root: Path, tmp_path: Path) -> None:
    test_ids = [d.name for d in (men_root / "test").glob("*/*")]
    shutil.rmtree(men_root / "test")
    edit_csv(men_root / "clinical.csv", lambda df: df[~df["patient_id"].isin(test_ids)])
    report = expect_problems("men", men_root, tmp_path / "out",
                             [("empty_split", "the test split has no patients: the final model could not be tested")])
    assert report.codes() == {"empty_split"}


@pytest.mark.parametrize("prefix, to, cls", [
    ("melanoma", "lentigo", "MEL"),  # every development melanoma has an ignored diagnosis
    (None, "melanoma", "NEV"),  # every development case is a melanoma (nothing filtered: no word of it)
])
def test_label_filtering_that_empties_a_class_of_the_development_split_is_refused(derm_root: Path, tmp_path: Path,
                                                                                  prefix: str | None, to: str,
                                                                                  cls: str) -> None:
    dev = ("train_indexes.csv", "valid_indexes.csv")
    for split_file in dev:
        relabel(derm_root, split_file, prefix, to)
    n = ignored_in(derm_root, *dev)
    filtered = f" after label filtering (source.ignored_labels dropped {n} of its rows)" if n else ""
    report = expect_problems("derm7pt", derm_root, tmp_path / "out", [
        ("empty_class", f"class {cls!r} has no patient in the development split{filtered}: the model cannot learn "
                        f"it")])
    assert report.codes() == {"empty_class"}


def test_a_class_missing_from_the_test_split_is_warned_naming_split_and_class(derm_root: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    from pipelines.prepare import main

    relabel(derm_root, "test_indexes.csv", "melanoma", "seborrheic keratosis")
    n = ignored_in(derm_root, "test_indexes.csv")
    assert main(["--dataset", "derm7pt", "--data-root", str(derm_root), "--out", str(tmp_path / "out"),
                 "--folds", str(FOLDS), "--image-size", *map(str, DERM_SIZE)]) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: [missing_class] class 'MEL' has no patient in the test split after label filtering "
                      f"(source.ignored_labels dropped {n} of its rows): its test sensitivity and AUC are undefined"]
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert info["counts"]["split"]["test"]["MEL"] == 0 and info["warnings"] == [warned[0].removeprefix("warning: ")]
