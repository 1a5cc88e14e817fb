"""pipelines/predict.py: a CSV of manifest rows -> a CSV of class probabilities, with a model
registered in a real MLflow store (SQLite in tmp), a run's model or a local model folder; every
refusal is one `error:` line naming the row, exit status 2, and no output file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cfcml.config import PROJECT_ROOT, load_experiment
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from cfcml.evaluation.calibration import Temperature, apply_temperature
from cfcml.evaluation.calibrator import Calibrator
from cfcml.evaluation.operating_points import OperatingPoint
from cfcml.networks import build_model
from pipelines.predict import main
from tuning.hpo.space import load_search
from tuning.records.checkpoints import FoldWeights
from tuning.release.served_model import ROOT_ENV, input_columns, log_and_register

SIZE = (32, 32, 8)
CALIBRATOR = Calibrator(Temperature(1.7, 1.0, 0.9, 10),
                        [OperatingPoint("youden", "youden", 1, "Grade_2_invasion", 0.25, None, 0.8, 0.7, 10)],
                        "out-of-fold predictions of trial t", 0.9)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny real network registered as cfcml-men version 1 in a fresh SQLite store."""
    tmp = tmp_path_factory.mktemp("predict")
    raw = make_men(tmp / "men", patients=12, seed=0, size=SIZE)
    prepared = prepare_dataset("men", raw, folds=2, fold_seed=0, image_size=SIZE, workers=1)
    base = load_experiment("men")
    experiment = base.replace({**load_search("smoke", base).overrides, "train.image_size": list(SIZE)})
    torch.manual_seed(0)
    network = build_model(prepared.spec, experiment.model)
    normalizer = prepared.fit_normalizer(prepared.dev_frame())
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("cfcml-men", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(exp_id, run_name="final").info.run_id
    log_and_register(tracking_uri=uri, run_id=run_id, prepared=prepared, experiment=experiment,
                     members=[FoldWeights(network.state_dict(), normalizer.state_dict())],
                     model_name="cfcml-men", tags={"stage": "test"},
                     pip_requirements=["torch", "mlflow"],  # skip MLflow's ~20 s requirement inference
                     calibrator=CALIBRATOR)
    rows = tmp / "rows.csv"
    prepared.test_frame()[input_columns(prepared.spec)].to_csv(rows, index=False)
    return {"uri": uri, "run_id": run_id, "prepared": prepared, "rows": rows}


@pytest.fixture(autouse=True)
def no_operator_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)


def predict(registered: dict, rows: Path, out: Path, *extra: str, model: str = "models:/cfcml-men/latest") -> int:
    return main(["--model", model, "--tracking-uri", registered["uri"], "--rows", str(rows), "--out", str(out),
                 *extra])


def edited(registered: dict, tmp_path: Path, **cells: tuple[int, str]) -> Path:
    """A copy of the rows CSV with cells changed: column=(data row, text)."""
    frame = pd.read_csv(registered["rows"], dtype=str, keep_default_na=False)
    for column, (row, value) in cells.items():
        frame.loc[row, column] = value
    path = tmp_path / "edited.csv"
    frame.to_csv(path, index=False)
    return path


def refused(capsys: pytest.CaptureFixture, out: Path) -> str:
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    return err


def test_a_registered_model_writes_probabilities_and_the_predicted_class(registered, tmp_path) -> None:
    out = tmp_path / "preds" / "preds.csv"
    assert predict(registered, registered["rows"], out) == 0
    preds = pd.read_csv(out, dtype={"patient_id": str})
    classes = list(registered["prepared"].spec.classes)
    assert list(preds.columns) == ["patient_id", *[f"prob_{c}" for c in classes], "predicted"]
    test = registered["prepared"].test_frame()
    assert list(preds["patient_id"]) == list(test["patient_id"])
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert list(preds["predicted"]) == [classes[i] for i in probs.argmax(1)]
    # the same numbers as the model called from Python on the manifest rows
    mlflow.set_tracking_uri(registered["uri"])
    direct = mlflow.pyfunc.load_model("models:/cfcml-men/1").predict(test[input_columns(registered["prepared"].spec)])
    np.testing.assert_allclose(probs, direct.to_numpy(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["run", "folder"])
def test_a_runs_uri_and_a_local_model_folder_give_the_same_predictions(registered, tmp_path, kind) -> None:
    assert predict(registered, registered["rows"], tmp_path / "a.csv") == 0
    model = f"runs:/{registered['run_id']}/model"
    if kind == "folder":
        mlflow.set_tracking_uri(registered["uri"])
        model = mlflow.artifacts.download_artifacts(model, dst_path=str(tmp_path / "local"))
    assert predict(registered, registered["rows"], tmp_path / "b.csv", model=model) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


def test_a_path_escaping_the_root_is_refused_naming_the_line_and_patient(registered, tmp_path, capsys) -> None:
    rows = edited(registered, tmp_path, path_t1=(1, "../../../../etc/passwd"))
    out = tmp_path / "preds.csv"
    assert predict(registered, rows, out) == 2
    pid = registered["prepared"].test_frame()["patient_id"].iloc[1]
    assert refused(capsys, out) == (
        f"error: edited.csv line 3 (patient '{pid}'), column 'path_t1': path '../../../../etc/passwd' escapes the "
        f"dataset root {registered['prepared'].root}; refused")


def test_an_unreadable_image_is_named_with_its_line_and_file(registered, tmp_path, capsys) -> None:
    root = registered["prepared"].root
    test = registered["prepared"].test_frame()
    broken = root / f"truncated-{tmp_path.name}.nii.gz"
    data = (root / test["path_adc"].iloc[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    out = tmp_path / "preds.csv"
    assert predict(registered, edited(registered, tmp_path, path_adc=(0, broken.name)), out) == 2
    err = refused(capsys, out)
    assert err.startswith(f"error: edited.csv line 2 (patient '{test['patient_id'].iloc[0]}'), column 'path_adc': "
                          f"cannot read adc image {broken}: file is truncated")


def test_missing_columns_are_named(registered, tmp_path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    pd.read_csv(registered["rows"]).drop(columns=["path_t2", "sex"]).to_csv(rows, index=False)
    out = tmp_path / "preds.csv"
    assert predict(registered, rows, out) == 2
    assert refused(capsys, out).startswith(f"error: {rows} lacks column(s) ['path_t2', 'sex']; the model needs")


def test_blank_and_missing_token_values_of_optional_fields_are_predicted_as_missing(registered, tmp_path) -> None:
    rows = edited(registered, tmp_path, adc_value=(0, ""), tumour_area=(1, "NA"), oedema_area=(2, " "))
    assert predict(registered, rows, tmp_path / "preds.csv") == 0
    assert len(pd.read_csv(tmp_path / "preds.csv")) == len(registered["prepared"].test_frame())


@pytest.mark.parametrize("column, value", [("age", ""), ("age", "NA"), ("location", ""), ("sex", "null")])
def test_a_blank_required_field_is_refused_as_prepare_refuses_it(registered, tmp_path, capsys, column, value) -> None:
    out = tmp_path / "preds.csv"
    assert predict(registered, edited(registered, tmp_path, **{column: (1, value)}), out) == 2
    pid = registered["prepared"].test_frame()["patient_id"].iloc[1]
    assert refused(capsys, out) == (f"error: edited.csv line 3 (patient '{pid}'), column {column!r}: value {value!r} "
                                    f"is missing and field {column!r} is not optional")


def _respelled(text: str, how: str) -> str:
    lines = text.splitlines()
    if how == "space after commas":
        return "\n".join(", ".join(line.split(",")) for line in lines) + "\n"
    if how == "header spaces":
        return "\n".join([" , ".join(c.strip() for c in lines[0].split(",")), *lines[1:]]) + "\n"
    if how == "padded values":
        return "\n".join([lines[0], *[",".join(f" {v}  " for v in line.split(",")) for line in lines[1:]]]) + "\n"
    if how == "BOM":
        return "\ufeff" + text
    if how == "CRLF":
        return "\r\n".join(lines) + "\r\n"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["space after commas", "header spaces", "padded values", "BOM", "CRLF"])
def test_a_csv_spelled_as_prepare_reads_it_gives_the_same_predictions(registered, tmp_path, how) -> None:
    assert predict(registered, registered["rows"], tmp_path / "a.csv") == 0
    rows = tmp_path / "respelled.csv"
    rows.write_bytes(_respelled(registered["rows"].read_text(), how).encode())
    assert predict(registered, rows, tmp_path / "b.csv") == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


@pytest.mark.parametrize("spell", [str, str.upper, lambda name: f" {name} "], ids=["same", "upper case", "spaces"])
@pytest.mark.parametrize("column", ["path_t1", "age"])
def test_a_rows_file_naming_a_column_twice_is_refused_naming_the_column(registered, tmp_path, capsys, column,
                                                                         spell) -> None:
    """A second `path_t1` (or `age`) was dropped in silence and the first one predicted on."""
    frame = pd.read_csv(registered["rows"], dtype=str, keep_default_na=False)
    rows = tmp_path / "rows.csv"
    text = frame.to_csv(index=False).splitlines()
    other = frame["path_t2" if column == "path_t1" else "age"].tolist()
    rows.write_text("\n".join([f"{text[0]},{spell(column)}", *[f"{line},{v}" for line, v in zip(text[1:], other)]]))
    out = tmp_path / "preds.csv"
    assert predict(registered, rows, out) == 2
    first, second = frame.columns.get_loc(column) + 1, len(frame.columns) + 1
    err = refused(capsys, out)
    assert err.startswith(f"error: {rows}: column{'s' if spell is str.upper else ''} {column!r}") and "\n" not in err
    assert err.endswith(f"in the header (fields {first} and {second} of line 1); rename or remove all but one")


def test_blank_rows_are_skipped_with_a_note_naming_their_lines(registered, tmp_path, capsys) -> None:
    lines = registered["rows"].read_text().splitlines()
    blank = "," * lines[0].count(",")
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join([lines[0], blank, *lines[1:], " ,  , ", ""]) + "\n")
    assert predict(registered, registered["rows"], tmp_path / "a.csv") == 0
    capsys.readouterr()
    assert predict(registered, rows, tmp_path / "b.csv") == 0
    assert (f"note: {rows}: skipped 2 blank row(s) of separators only (lines 2, {len(lines) + 2})"
            in capsys.readouterr().err)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


def test_an_error_after_a_value_spanning_lines_names_the_file_line_the_row_starts_on(registered, tmp_path,
                                                                                    capsys) -> None:
    frame = pd.read_csv(registered["rows"], dtype=str, keep_default_na=False)
    frame["comment"] = ["seen twice:\nfirst visit\nsecond visit", *[""] * (len(frame) - 1)]
    frame.loc[1, "path_t1"] = "../../../../etc/passwd"
    rows = tmp_path / "rows.csv"
    frame.to_csv(rows, index=False)
    out = tmp_path / "preds.csv"
    assert predict(registered, rows, out) == 2
    assert refused(capsys, out).startswith(  # line 1 the header, lines 2-4 the first row
        f"error: rows.csv line 5 (patient '{frame.loc[1, 'patient_id']}'), column 'path_t1': path "
        "'../../../../etc/passwd' escapes")


@pytest.mark.parametrize("fill, code_words", [
    (lambda v: np.zeros_like(v), "every voxel is 0"),
    (lambda v: np.full_like(v, 417), "every non-zero voxel is 417"),
])
def test_an_image_prepare_would_refuse_is_refused_before_any_prediction(registered, tmp_path, capsys, fill,
                                                                         code_words) -> None:
    root = registered["prepared"].root
    test = registered["prepared"].test_frame()
    src = nib.load(root / test["path_t2"].iloc[2])
    bad = root / f"degenerate-{tmp_path.name}.nii.gz"
    nib.save(nib.Nifti1Image(fill(np.asarray(src.dataobj)), src.affine), bad)
    out = tmp_path / "preds.csv"
    assert predict(registered, edited(registered, tmp_path, path_t2=(2, bad.name)), out) == 2
    err = refused(capsys, out)
    assert err.startswith(f"error: edited.csv line 4 (patient '{test['patient_id'].iloc[2]}'), column 'path_t2': "
                          f"cannot read t2 image {bad}: ") and code_words in err
    assert "predicting" not in err  # refused before the progress bar started


def test_a_volume_saturated_by_the_clip_window_is_predicted_with_a_warning_naming_it(registered, tmp_path,
                                                                                    capsys) -> None:
    root = registered["prepared"].root
    test = registered["prepared"].test_frame()
    src = nib.load(root / test["path_t1"].iloc[1])
    vol = np.asarray(src.dataobj).astype(np.float32)
    vol = vol * (1200 / np.percentile(vol[vol != 0], 20))  # about 80% of the tissue above the window's 1200
    bright = root / f"bright-{tmp_path.name}.nii.gz"
    nib.save(nib.Nifti1Image(vol, src.affine), bright)
    out = tmp_path / "preds.csv"
    assert predict(registered, edited(registered, tmp_path, path_t1=(1, bright.name)), out) == 0
    err = capsys.readouterr().err
    share = (vol > 1200).sum() / (vol != 0).sum()
    assert (f"warning: edited.csv line 3 (patient '{test['patient_id'].iloc[1]}'), column 'path_t1': t1 image "
            f"{bright}: {share:.0%} of the non-zero voxels lie outside the clip window [0, 1200]") in err
    assert len(pd.read_csv(out)) == len(test)


def test_a_volume_stored_mirrored_is_predicted_like_the_original(registered, tmp_path) -> None:
    root = registered["prepared"].root
    test = registered["prepared"].test_frame()
    src = nib.load(root / test["path_adc"].iloc[0])
    affine = src.affine.copy()
    affine[0, 3] += (src.shape[0] - 1) * affine[0, 0]
    affine[0, 0] *= -1
    mirrored = root / f"mirrored-{tmp_path.name}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.flip(np.asarray(src.dataobj), 0)), affine), mirrored)
    assert predict(registered, registered["rows"], tmp_path / "a.csv") == 0
    assert predict(registered, edited(registered, tmp_path, path_adc=(0, mirrored.name)), tmp_path / "b.csv") == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


# --- the output path: checked before any work, never an input, written atomically ---------------------

@pytest.mark.parametrize("kind", ["folder", "under a file", "the rows file", "a link to the rows file"])
def test_a_bad_out_path_is_refused_before_the_model_loads(registered, tmp_path, capsys, kind) -> None:
    rows = tmp_path / "rows.csv"
    shutil.copy(registered["rows"], rows)
    before = rows.read_bytes()
    out = {"folder": tmp_path, "under a file": rows / "preds.csv", "the rows file": rows,
           "a link to the rows file": tmp_path / "link.csv"}[kind]
    if kind == "a link to the rows file":
        out.symlink_to(rows)
    # an unknown model: had the model been looked up first, the error would name it
    assert predict(registered, rows, out, model="models:/cfcml-nope/1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out.absolute()}") and "\n" not in err
    assert rows.read_bytes() == before and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("link", [False, True])
def test_out_naming_an_input_image_is_refused_before_any_prediction(registered, tmp_path, capsys, link) -> None:
    root = registered["prepared"].root
    image = root / registered["prepared"].test_frame()["path_t1"].iloc[0]
    before = image.read_bytes()
    out = image
    if link:  # another name of the same file
        out = tmp_path / "preds.csv"
        os.link(image, out)
    assert predict(registered, registered["rows"], out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out} is one of the input images; it would be overwritten"
    assert image.read_bytes() == before
    assert not list(image.parent.glob("*.tmp")) and not list(image.parent.glob(".*.tmp"))


def test_a_successful_run_leaves_no_temporary_file(registered, tmp_path) -> None:
    assert predict(registered, registered["rows"], tmp_path / "preds.csv") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


def test_the_operators_data_root_replaces_the_registered_one(registered, tmp_path, capsys) -> None:
    root = registered["prepared"].root
    moved = Path(shutil.copytree(root, tmp_path / "moved", ignore=shutil.ignore_patterns("prepared", "*-*")))
    assert predict(registered, registered["rows"], tmp_path / "a.csv") == 0
    assert predict(registered, registered["rows"], tmp_path / "b.csv", "--data-root", str(moved)) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))
    assert f"images under {moved}" in capsys.readouterr().out
    # under the new root, the registered one is "elsewhere"
    first = registered["prepared"].test_frame()["path_t1"].iloc[0]
    out = tmp_path / "c.csv"
    assert predict(registered, edited(registered, tmp_path, path_t1=(0, str(root / first))), out,
                   "--data-root", str(moved)) == 2
    assert "escapes the dataset root" in refused(capsys, out)


@pytest.mark.parametrize("model,message", [
    ("models:/cfcml-nope/1", "error: model models:/cfcml-nope/1 (tracking URI sqlite:///"),
    ("no/such/folder", "error: model folder no/such/folder not found"),
])
def test_an_unknown_model_is_one_line(registered, tmp_path, capsys, model, message) -> None:
    out = tmp_path / "preds.csv"
    assert predict(registered, registered["rows"], out, model=model) == 2
    err = refused(capsys, out)
    assert err.startswith(message) and "\n" not in err


def test_an_image_size_limit_that_is_not_a_size_is_one_line_before_the_model_loads(registered, tmp_path, capsys,
                                                                                   monkeypatch) -> None:
    monkeypatch.setenv("CFCML_MAX_IMAGE_BYTES", "big")
    out = tmp_path / "preds.csv"
    assert predict(registered, registered["rows"], out, model="models:/no-such-model/1") == 2
    assert refused(capsys, out) == "error: $CFCML_MAX_IMAGE_BYTES='big' is not a size: give a positive whole number " \
                                   "of bytes, or one with KiB, MiB or GiB (e.g. 2GiB)"


def test_a_missing_rows_file_is_one_line(registered, tmp_path, capsys) -> None:
    out = tmp_path / "preds.csv"
    assert predict(registered, tmp_path / "absent.csv", out) == 2
    assert refused(capsys, out) == f"error: rows file {tmp_path / 'absent.csv'} does not exist"


def test_the_script_runs_from_a_checkout_without_path_edits() -> None:
    done = subprocess.run([sys.executable, "pipelines/predict.py", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--model" in done.stdout and "--data-root" in done.stdout


def test_raw_and_an_operating_point_are_asked_by_flag(registered, tmp_path) -> None:
    classes = list(registered["prepared"].spec.classes)
    cols = [f"prob_{c}" for c in classes]
    assert predict(registered, registered["rows"], tmp_path / "cal.csv") == 0
    assert predict(registered, registered["rows"], tmp_path / "raw.csv", "--raw") == 0
    assert predict(registered, registered["rows"], tmp_path / "op.csv", "--operating-point",
                   "Grade_2_invasion:youden") == 0
    cal, raw, op = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("cal", "raw", "op"))
    np.testing.assert_allclose(cal[cols].to_numpy(), apply_temperature(raw[cols].to_numpy(), 1.7), atol=1e-6)
    assert list(op.columns[-3:]) == ["operating_point", "threshold", "decision"]
    assert (op["decision"] == (op["prob_Grade_2_invasion"] >= 0.25)).all()


def test_an_unknown_operating_point_is_one_line_naming_the_known_ones(registered, tmp_path, capsys) -> None:
    out = tmp_path / "preds.csv"
    assert predict(registered, registered["rows"], out, "--operating-point", "nope") == 2
    assert "--operating-point: no operating point 'nope'; known: Grade_2_invasion:youden" in refused(capsys, out)


# --- a model folder runs no code of its own ---------------------------------------------------------

def model_folder(registered: dict, dest: Path) -> Path:
    """The registered model's folder, as the platform logged it (a run's artifacts)."""
    mlflow.set_tracking_uri(registered["uri"])
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{registered['run_id']}/model", dst_path=str(dest)))


def writes(marker: Path) -> str:
    """Python source that creates `marker` when it runs."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"


def crafted(folder: Path, how: str, marker: Path) -> str:
    """Make the platform's model folder run code that creates `marker` on loading; returns the
    file (relative to the folder) the refusal must name."""
    import pickle

    import yaml

    meta = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = meta["flavors"]["python_function"]
    if how == "its own model code":
        code = folder / Path(flavor["model_code_path"]).name
        code.write_text(writes(marker) + code.read_text())
        return code.name
    if how == "a loader module in its code folder":
        loader = "def _load_pyfunc(path):\n    raise RuntimeError('crafted')\n"
        (folder / "code" / "cfcml_loader.py").write_text(writes(marker) + loader)
        flavor["loader_module"] = "cfcml_loader"
        (folder / "MLmodel").write_text(yaml.safe_dump(meta))
        return "MLmodel"
    if how == "a module in its code folder":
        (folder / "code" / "nibabel.py").write_text(writes(marker))
        return "code/nibabel.py"
    if how == "a pickled python model":
        class Payload:
            def __reduce__(self):
                return (Path.write_text, (marker, "ran"))

        (folder / "python_model.pkl").write_bytes(pickle.dumps(Payload()))
        del flavor["model_code_path"]
        flavor["python_model"] = "python_model.pkl"
        (folder / "MLmodel").write_text(yaml.safe_dump(meta))
        return "python_model.pkl"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["its own model code", "a loader module in its code folder",
                                 "a module in its code folder", "a pickled python model"])
def test_a_model_folder_carrying_code_of_its_own_is_refused_before_any_of_it_runs(registered, tmp_path, capsys,
                                                                                   how) -> None:
    folder = model_folder(registered, tmp_path / "model")
    marker = tmp_path / "code-ran"
    file = crafted(folder, how, marker)
    capsys.readouterr()  # (the download's progress bar)
    out = tmp_path / "preds.csv"
    assert predict(registered, registered["rows"], out, model=str(folder)) == 2
    err = refused(capsys, out)
    assert err.startswith(f"error: model folder {folder.resolve()}: {file} ") and "\n" not in err
    assert err.endswith("; refused before loading anything of it (pass --trust-model-code to run a model's own code)")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["its own model code", "a loader module in its code folder", "a pickled python model"])
def test_the_crafted_folders_do_run_their_code_when_trusted(registered, tmp_path, how) -> None:
    """What the refusals above prevent: MLflow loading these folders runs their code."""
    folder = model_folder(registered, tmp_path / "model")
    marker = tmp_path / "code-ran"
    crafted(folder, how, marker)
    predict(registered, registered["rows"], tmp_path / "preds.csv", "--trust-model-code", model=str(folder))
    assert marker.read_text() == "ran"


def test_a_logged_model_carrying_code_of_its_own_is_refused_by_its_uri(registered, tmp_path, capsys) -> None:
    folder = model_folder(registered, tmp_path / "model")
    marker = tmp_path / "code-ran"
    crafted(folder, "its own model code", marker)
    client = mlflow.MlflowClient(registered["uri"])
    run_id = client.create_run(client.get_run(registered["run_id"]).info.experiment_id).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    capsys.readouterr()  # (this test's own download)
    out = tmp_path / "preds.csv"
    assert predict(registered, registered["rows"], out, model=f"runs:/{run_id}/model") == 2
    assert refused(capsys, out) == (
        f"error: model runs:/{run_id}/model (tracking URI {registered['uri']}): served_model_code.py is not the "
        "platform's served-model code (its content differs from tuning/release/served_model_code.py); refused before "
        "loading anything of it (pass --trust-model-code to run a model's own code)")
    assert not marker.exists()


def test_trust_model_code_loads_a_model_whose_code_differs(registered, tmp_path, capsys) -> None:
    folder = model_folder(registered, tmp_path / "model")
    marker = tmp_path / "code-ran"
    crafted(folder, "its own model code", marker)  # the platform's code, with one line more
    assert predict(registered, registered["rows"], tmp_path / "a.csv", model=str(folder)) == 2
    assert not marker.exists()
    assert predict(registered, registered["rows"], tmp_path / "b.csv", "--trust-model-code", model=str(folder)) == 0
    assert marker.read_text() == "ran"
    assert predict(registered, registered["rows"], tmp_path / "c.csv") == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv"), pd.read_csv(tmp_path / "c.csv"))


def test_the_platforms_model_folder_passes_the_check_and_loads_with_pickles_off(registered, tmp_path) -> None:
    from tuning.workflows.predict import load_model

    folder = model_folder(registered, tmp_path / "model")
    assert sorted(p.name for p in (folder / "code").iterdir()) == ["cfcml", "tuning"]
    before = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    model, python_model = load_model(str(folder), None, tmp_path)
    assert type(python_model).__module__ == "tuning.release.served_model"
    assert str(folder / "code") not in sys.path  # nothing more is imported from the folder
    assert os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") == before
