"""prepare on generator output: manifest, folds, cache, the prepared-dataset handle, the manifest
adapter and the command line."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from cfcml.data.cache import cache_file
from cfcml.data.images import preprocess, read_image
from cfcml.data.manifest import PreparedDataset
from cfcml.data.prepare import prepare_dataset
from cfcml.data.splits import assign_folds
from cfcml.data.validation import DatasetValidationError

MEN_SIZE, DERM_SIZE, FOLDS = (12, 12, 6), (16, 16), 3  # as in conftest.py


def test_men_generator_output_passes_validation(men_prepared, men_base: Path) -> None:
    m = men_prepared.manifest
    clinical = pd.read_csv(men_base / "clinical.csv")
    latents = pd.read_csv(men_base / "_synthetic_latents.csv")
    assert len(m) == len(clinical) == 18
    assert list(m.columns[:5]) == ["patient_id", "label", "label_name", "split", "fold"]
    assert {"path_t1", "path_t2", "path_adc", "location", "sex", "age", "adc_value", "tumour_area",
            "oedema_area"} <= set(m.columns)
    truth = latents.set_index("patient_id")
    for row in m.itertuples():
        assert row.label_name == truth.at[row.patient_id, "label"]
        assert row.split == ("dev" if truth.at[row.patient_id, "split"] == "train" else "test")
        assert men_prepared.spec.classes[row.label] == row.label_name
    assert m["age"].dtype == np.float64 and set(m["location"]) <= {"1", "2", "3"}
    assert men_prepared.spec.modalities[0].size == MEN_SIZE


def test_derm_generator_output_passes_validation(derm_prepared, derm_base: Path) -> None:
    m = derm_prepared.manifest
    latents = pd.read_csv(derm_base / "_synthetic_latents.csv")
    task = latents[latents["label"] != "other"]  # other diagnoses are left out
    assert len(m) == len(task) == 30
    truth = task.assign(case_num=task["case_num"].astype(str)).set_index("case_num")
    for row in m.itertuples():
        assert row.label_name == truth.at[row.patient_id, "label"]
        assert row.split == ("test" if truth.at[row.patient_id, "split"] == "test" else "dev")  # train+valid = dev
        assert row.path_clinic.startswith("images/")
    assert derm_prepared.spec.task == "binary" and derm_prepared.spec.selection_metric == "auc"


@pytest.mark.parametrize("name", ["men_prepared", "derm_prepared"])
def test_folds_are_disjoint_stratified_and_exclude_the_test_split(name: str, request: pytest.FixtureRequest) -> None:
    prepared: PreparedDataset = request.getfixturevalue(name)
    m = prepared.manifest
    test_ids = set(prepared.test_frame()["patient_id"])
    assert (m.loc[m["split"] == "test", "fold"] == -1).all()
    assert set(m.loc[m["split"] == "dev", "fold"]) == set(range(FOLDS))
    seen: set[str] = set()
    for k in range(FOLDS):
        train, val = prepared.fold_frames(k)
        assert not set(train["patient_id"]) & set(val["patient_id"])  # disjoint by patient
        assert not (set(train["patient_id"]) | set(val["patient_id"])) & test_ids  # never a test patient
        assert len(train) + len(val) == len(prepared.dev_frame())
        assert not seen & set(val["patient_id"])
        seen |= set(val["patient_id"])
    assert seen == set(prepared.dev_frame()["patient_id"])  # each dev patient validates exactly once
    per_fold = m[m["split"] == "dev"].groupby(["label", "fold"]).size().unstack(fill_value=0)
    assert (per_fold.max(axis=1) - per_fold.min(axis=1) <= 1).all()  # stratified


def test_folds_are_stable_for_a_seed_and_independent_of_row_order() -> None:
    rng = np.random.default_rng(0)
    ids = pd.Series([f"P{i:03d}" for i in range(40)])
    labels = pd.Series(rng.integers(0, 3, 40))
    split = pd.Series(["dev"] * 32 + ["test"] * 8)
    a = assign_folds(ids, labels, split, 4, seed=7)
    perm = rng.permutation(40)
    b = assign_folds(ids[perm].reset_index(drop=True), labels[perm].reset_index(drop=True),
                     split[perm].reset_index(drop=True), 4, seed=7)
    assert dict(zip(ids, a)) == dict(zip(ids[perm], b))
    assert not a.equals(assign_folds(ids, labels, split, 4, seed=8))
    assert (a[split == "test"] == -1).all()


def test_same_seed_same_manifest(men_base: Path, men_prepared, tmp_path: Path) -> None:
    again = prepare_dataset("men", men_base, tmp_path / "again", folds=FOLDS, fold_seed=0, image_size=MEN_SIZE,
                            workers=2)
    pd.testing.assert_frame_equal(again.manifest, men_prepared.manifest)
    assert again.fingerprint == men_prepared.fingerprint
    other = prepare_dataset("men", men_base, tmp_path / "other", folds=FOLDS, fold_seed=1, image_size=MEN_SIZE,
                            workers=2)
    assert other.fingerprint != men_prepared.fingerprint


def test_prepared_dataset_round_trip(men_prepared) -> None:
    loaded = PreparedDataset.load(men_prepared.out_dir)
    pd.testing.assert_frame_equal(loaded.manifest, men_prepared.manifest, check_dtype=False)
    assert loaded.spec == men_prepared.spec
    assert loaded.folds == FOLDS and loaded.fingerprint == men_prepared.fingerprint
    info = json.loads((men_prepared.out_dir / "prepare.json").read_text())
    assert info["fingerprint"] == loaded.fingerprint and info["image_size"]["t1"] == list(MEN_SIZE)
    assert sum(info["counts"]["split"]["dev"].values()) == len(loaded.dev_frame())


def test_cache_holds_preprocessed_volumes(men_prepared) -> None:
    row = men_prepared.dev_frame().iloc[0]
    vol = np.load(cache_file(men_prepared.cache_dir, row["patient_id"], "t2"))
    assert vol.shape == (1, *MEN_SIZE) and vol.dtype == np.float16
    inside = vol[vol != 0].astype(np.float32)
    assert abs(inside.mean()) < 0.3 and 0.6 < inside.std() < 1.4  # z-scored inside the mask
    assert men_prepared.cache_dir.name.startswith("12x12x6-")


def test_rerun_reuses_the_cache_and_another_size_builds_another(men_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare_dataset("men", men_base, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    assert first.info["cache"]["built"] == 54
    second = prepare_dataset("men", men_base, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    assert second.info["cache"] == {"built": 0, "reused": 54, "total": 54}
    bigger = prepare_dataset("men", men_base, out, folds=FOLDS, image_size=(16, 16, 6), workers=2)
    assert bigger.cache_dir != first.cache_dir and bigger.info["cache"]["built"] == 54
    assert first.cache_dir.exists()


def test_optional_numeric_field_may_be_missing(men_root: Path, tmp_path: Path) -> None:
    df = pd.read_csv(men_root / "clinical.csv", dtype=str, keep_default_na=False)
    df.loc[0, "oedema_area"] = ""  # optional in conf/datasets/men.yaml
    df.loc[1, "adc_value"] = "NA"
    df.to_csv(men_root / "clinical.csv", index=False)
    prepared = prepare_dataset("men", men_root, tmp_path / "out", folds=FOLDS, image_size=MEN_SIZE, workers=2)
    m = prepared.manifest.set_index("patient_id")
    assert np.isnan(m.at[df.loc[0, "patient_id"], "oedema_area"])
    assert np.isnan(m.at[df.loc[1, "patient_id"], "adc_value"])


def test_cli_prepares_and_prints_a_summary(derm_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.prepare import main

    out = tmp_path / "out"
    assert main(["--dataset", "derm7pt", "--root", str(derm_base), "--out", str(out), "--folds", "3",
                 "--image-size", "16", "16", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "prepared derm7pt" in text and "fold 2" in text and "NEV" in text
    assert PreparedDataset.load(out).spec.modalities[1].size == DERM_SIZE


# --- generic manifest adapter -------------------------------------------------------------------

def _manifest_dataset(men_root: Path, with_split: bool) -> Path:
    """MEN as a user's own dataset: one CSV with paths + a dataset YAML."""
    spec = yaml.safe_load(Path("conf/datasets/men.yaml").read_text())
    spec["name"] = "my_men"
    spec["label"] = "grade"
    spec["modalities"] = [{"name": n, "dims": 3, "channels": 1, "column": f"{n}_file"} for n in ("t1", "t2", "adc")]
    spec["source"] = {"table": "cases.csv", "id_column": "subject"}
    (men_root / "my_men.yaml").write_text(yaml.safe_dump(spec))
    clinical = pd.read_csv(men_root / "clinical.csv", dtype=str, keep_default_na=False)
    rows = []
    for folder in sorted(men_root.glob("*/*/*")):
        split, grade, pid = folder.relative_to(men_root).parts
        rows.append({"subject": pid, "grade": grade, **({"split": split} if with_split else {}),
                     **{f"{n}_file": f"{split}/{grade}/{pid}/{n}_bbox.nii.gz" for n in ("t1", "t2", "adc")}})
    cases = pd.DataFrame(rows).merge(clinical.rename(columns={"patient_id": "subject"}), on="subject")
    cases.to_csv(men_root / "cases.csv", index=False)
    return men_root / "my_men.yaml"


def test_manifest_adapter_with_split_column(men_root: Path, men_prepared, tmp_path: Path) -> None:
    spec = _manifest_dataset(men_root, with_split=True)
    prepared = prepare_dataset("manifest", men_root, tmp_path / "out", spec=spec, folds=FOLDS, image_size=MEN_SIZE,
                               workers=2)
    assert prepared.spec.name == "my_men"
    mine = prepared.manifest.set_index("patient_id").sort_index()
    men = men_prepared.manifest.set_index("patient_id").sort_index()
    assert (mine["label_name"] == men["label_name"]).all() and (mine["split"] == men["split"]).all()


def test_manifest_adapter_holds_out_a_seeded_stratified_test_split(men_root: Path, tmp_path: Path) -> None:
    spec = _manifest_dataset(men_root, with_split=False)
    a, b = (prepare_dataset("manifest", men_root, tmp_path / name, spec=spec, folds=2, fold_seed=3,
                            image_size=MEN_SIZE, workers=2) for name in ("a", "b"))
    test = a.test_frame()
    assert set(test["patient_id"]) == set(b.test_frame()["patient_id"])
    assert 2 <= len(test) <= 5 and test["label_name"].nunique() == 3  # 20% of 18, every class


def test_manifest_adapter_validates_like_the_others(men_root: Path, tmp_path: Path) -> None:
    spec = _manifest_dataset(men_root, with_split=True)
    cases = pd.read_csv(men_root / "cases.csv", dtype=str, keep_default_na=False)
    cases.loc[0, "t1_file"] = "../../../etc/passwd"
    cases.loc[1, "grade"] = "Grade_9"
    cases.loc[2, "split"] = "holdout"
    cases.to_csv(men_root / "cases.csv", index=False)
    with pytest.raises(DatasetValidationError) as info:
        prepare_dataset("manifest", men_root, tmp_path / "out", spec=spec, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    text = str(info.value)
    assert {"path_escape", "unknown_label", "bad_split"} <= info.value.report.codes()
    for culprit in (cases.loc[0, "subject"], "../../../etc/passwd", "Grade_9", "holdout"):
        assert culprit in text
    assert not (tmp_path / "out").exists()


def test_manifest_adapter_requires_a_spec(men_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset YAML"):
        prepare_dataset("manifest", men_base, tmp_path / "out")


def test_default_output_folder_is_inside_the_root(derm_root: Path) -> None:
    prepared = prepare_dataset("derm7pt", derm_root, folds=FOLDS, image_size=DERM_SIZE, workers=2)
    assert prepared.out_dir == derm_root.resolve() / "prepared"
    shutil.rmtree(prepared.out_dir)


# --- a dataset is identified by its content ---------------------------------------------------------

def _edit_in_place_keeping_size_and_mtime(f: Path) -> None:
    """Swap two voxels of a .nii.gz volume so that the gzip file keeps its byte size, then put
    its mtime back (as `cp -p` or `rsync -t` would): only the content tells the edit apart."""
    st = f.stat()
    img = nib.load(f)
    vol = np.asarray(img.dataobj).copy()
    flat = vol.reshape(-1)
    nonzero = np.flatnonzero(flat)
    for a, b in zip(nonzero[::7], nonzero[3::7]):
        if flat[a] == flat[b]:
            continue
        edited = flat.copy()
        edited[[a, b]] = edited[[b, a]]
        raw = nib.Nifti1Image(edited.reshape(vol.shape), img.affine, img.header).to_bytes()
        data = gzip.compress(raw, compresslevel=1, mtime=0)
        if len(data) == st.st_size:
            f.write_bytes(data)
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
            return
    raise AssertionError("no same-size edit found")


@pytest.mark.parametrize("keep_mtime", [True, False])
def test_an_image_edited_in_place_changes_the_fingerprint_and_is_rebuilt(men_root: Path, tmp_path: Path,
                                                                         keep_mtime: bool) -> None:
    f = sorted((men_root / "train" / "Grade_1").iterdir())[0] / "t1_bbox.nii.gz"
    out = tmp_path / "out"
    first = prepare_dataset("men", men_root, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    pid = f.parent.name
    before = np.load(cache_file(first.cache_dir, pid, "t1")).copy()
    st = f.stat()
    _edit_in_place_keeping_size_and_mtime(f)
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    if not keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = prepare_dataset("men", men_root, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    assert second.fingerprint != first.fingerprint
    assert second.info["cache"] == {"built": 1, "reused": 53, "total": 54}
    after = np.load(cache_file(second.cache_dir, pid, "t1"))
    assert not np.array_equal(before, after)
    t1 = second.spec.modalities[0]
    np.testing.assert_array_equal(after, preprocess(read_image(f, t1), t1, second.spec.intensity).astype(np.float16))


def test_the_same_content_gives_the_same_fingerprint_wherever_it_lies(men_base: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(men_base, tmp_path / "copy"))  # new mtimes, same bytes
    a = prepare_dataset("men", men_base, tmp_path / "a", folds=FOLDS, image_size=MEN_SIZE, workers=2)
    b = prepare_dataset("men", copy, tmp_path / "b", folds=FOLDS, image_size=MEN_SIZE, workers=2)
    assert a.fingerprint == b.fingerprint


# --- output folder: checked before any image is read ------------------------------------------------

@pytest.mark.parametrize("where", ["a file", "under a file", "manifest is the csv"])
def test_a_bad_output_folder_is_refused_before_validation(men_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, where: str) -> None:
    from pipelines.prepare import main

    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    dataset = "men"
    if where == "manifest is the csv":  # a user's dataset whose CSV sits where prepare writes its manifest
        dataset = str(_manifest_dataset(men_root, with_split=True))
        out = tmp_path / "o"
        out.mkdir()
        afile = out / "manifest.parquet"
        (men_root / "cases.csv").rename(afile)
    else:
        out = afile if where == "a file" else afile / "out"
    (men_root / "train" / "Grade_1").rename(men_root / "train" / "Grade_9")  # a dataset problem: not reached
    before = afile.read_bytes()
    code = main(["--dataset", dataset, "--data-root", str(men_root), "--out", str(out), "--folds", "3",
                 "--csv", str(afile)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: prepare's output") and "\n" not in err, err
    assert "Grade_9" not in err and afile.read_bytes() == before


# --- Ctrl-C: one line, exit 130, only what the run created is removed -------------------------------

@pytest.mark.parametrize("before", ["no output folder", "an empty output folder", "a prepare of another size"])
def test_ctrl_c_while_caching_prints_one_line_exits_130_and_removes_only_what_the_run_created(
        men_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        before: str) -> None:
    """A real SIGINT, sent to this process while the third image is being cached (as Ctrl-C in the
    terminal sends it), reaches prepare as KeyboardInterrupt in the main thread."""
    import signal

    import cfcml.data.cache as cache
    from pipelines.prepare import main

    out = tmp_path / "out"
    if before == "an empty output folder":
        out.mkdir()
    if before == "a prepare of another size":
        prepare_dataset("men", men_base, out, folds=FOLDS, image_size=MEN_SIZE, workers=2)
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    calls = []

    def preprocess_then_ctrl_c(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return preprocess(*args, **kwargs)

    monkeypatch.setattr(cache, "preprocess", preprocess_then_ctrl_c)
    code = main(["--dataset", "men", "--data-root", str(men_base), "--out", str(out), "--folds", str(FOLDS),
                 "--image-size", "8", "8", "4", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 130 and 3 <= len(calls) < 18 * 3
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: prepare stopped and removed its partial output ") and "\n" not in last
    removed = Path(last.rsplit(" ", 1)[1])
    expected = {"no output folder": out, "an empty output folder": out / "cache"}.get(before)
    if expected is not None:
        assert removed == expected
    else:  # the new size's cache folder only; the previous prepare is untouched
        assert removed.parent == out / "cache" and removed.name.startswith("8x8x4-")
    assert not removed.exists()
    if before == "no output folder":
        assert not out.exists()
    else:
        assert out.is_dir() and {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert not list(tmp_path.rglob("*.tmp*"))


def test_ctrl_c_while_validating_writes_nothing_and_says_so(men_base: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import cfcml.data.validation as validation
    from pipelines.prepare import main

    check_image = validation.check_image
    calls = []

    def check_then_ctrl_c(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return check_image(*args, **kwargs)

    monkeypatch.setattr(validation, "check_image", check_then_ctrl_c)
    out = tmp_path / "out"
    assert main(["--dataset", "men", "--data-root", str(men_base), "--out", str(out), "--folds", str(FOLDS),
                 "--image-size", *map(str, MEN_SIZE), "--workers", "1"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: prepare stopped before writing anything"
    assert not out.exists() and len(calls) < 18 * 3


@pytest.mark.parametrize("patient_id", ["Müller_0001", "Ñúñez Pérez 7", "患者_3"])
def test_accented_patient_ids_under_an_accented_data_root_prepare_and_read_back(patient_id: str,
                                                                                tmp_path: Path) -> None:
    """Hospital folders and patient ids carry accents: the raw folder, the patient's image folder and
    id beyond ASCII; the cache file name stays ASCII (`cache_file`) and distinct."""
    from cfcml.data.cache import damaged_entries
    from cfcml.data.synthetic import make_men

    root = make_men(tmp_path / "Klinik Düsseldorf" / "men", patients=12, seed=0, size=(16, 16, 4))
    (folder,) = root.glob("*/*/MEN_0001")
    folder.rename(folder.with_name(patient_id))
    csv = root / "clinical.csv"
    csv.write_text(csv.read_text(encoding="utf-8").replace("MEN_0001,", f"{patient_id},"), encoding="utf-8")
    prepared = prepare_dataset("men", root, tmp_path / "präpariert", folds=2, fold_seed=0, image_size=(16, 16, 4))
    again = PreparedDataset.load(prepared.out_dir)
    assert patient_id in set(again.manifest["patient_id"])
    path = again.cache_path(patient_id, "t1")
    assert path.name.isascii() and path.is_file()
    assert damaged_entries(again.manifest, again.spec, again.cache_dir) == []
    assert again.info["root"] == str(root.resolve())
