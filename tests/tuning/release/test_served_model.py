"""The served model reads only files under its data root: the root fixed at registration or the
operator's $CFCML_DATA_ROOT, never one a request chooses. Real bundle, real tiny network, real
NIfTI files; one test goes through a real MLflow pyfunc."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from crafted_images import nifti_header_only

from cfcml.config import load_experiment
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from cfcml.networks import build_model
from tuning.hpo.space import load_search
from tuning.records.checkpoints import FoldWeights
from tuning.release.served_model import (
    MODEL_CODE,
    ROOT_ENV,
    CFCMLModel,
    InputError,
    UntrustedModelError,
    check_model_code,
    input_columns,
    log_and_register,
    placeholder_example,
    write_bundle,
)

SIZE = (32, 32, 8)  # the smallest volume the tiny encoder takes


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    raw = make_men(tmp_path_factory.mktemp("served") / "men", patients=12, seed=0, size=SIZE)
    return prepare_dataset("men", raw, folds=2, fold_seed=0, image_size=SIZE, workers=1)


@pytest.fixture(scope="module")
def bundle(prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = load_experiment("men")
    experiment = base.replace({**load_search("smoke", base).overrides, "train.image_size": list(SIZE)})
    torch.manual_seed(0)
    network = build_model(prepared.spec, experiment.model)
    normalizer = prepared.fit_normalizer(prepared.dev_frame())
    return write_bundle(tmp_path_factory.mktemp("bundle") / "bundle", spec=prepared.spec, experiment=experiment,
                        members=[FoldWeights(network.state_dict(), normalizer.state_dict())], root=prepared.root)


@pytest.fixture(scope="module")
def served(bundle: Path) -> CFCMLModel:
    return CFCMLModel.from_bundle(bundle)


@pytest.fixture
def rows(prepared) -> pd.DataFrame:
    return prepared.test_frame()[input_columns(prepared.spec)]


@pytest.fixture(autouse=True)
def no_operator_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)


def outside_file(prepared, tmp_path: Path) -> Path:
    """A real, readable NIfTI volume outside the data root."""
    target = tmp_path / "outside" / "secret.nii.gz"
    target.parent.mkdir()
    shutil.copy(prepared.root / prepared.test_frame()["path_t1"].iloc[0], target)
    return target


def test_rows_with_relative_paths_under_the_root_get_probabilities(served, rows) -> None:
    rows.index = [10, 11, 12][: len(rows)]
    probs = served.predict(None, rows)
    assert list(probs.columns) == list(served.spec.classes)
    assert list(probs.index) == list(rows.index)  # aligned with the caller's rows
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-5)


def test_a_dotdot_path_is_refused_naming_row_patient_column_and_path(served, rows) -> None:
    rows.loc[1, "path_t2"] = "../../../../etc/passwd"
    pid = rows.loc[1, "patient_id"]
    with pytest.raises(InputError, match=rf"^row 1 \(patient '{pid}'\), column 'path_t2': path "
                                         rf"'\.\./\.\./\.\./\.\./etc/passwd' escapes the dataset root "):
        served.predict(None, rows)


def test_an_absolute_path_elsewhere_is_refused_even_to_a_real_image(served, rows, prepared, tmp_path) -> None:
    secret = outside_file(prepared, tmp_path)
    rows.loc[0, "path_adc"] = str(secret)
    with pytest.raises(InputError, match=r"row 0 .*column 'path_adc': path '.*secret\.nii\.gz' escapes"):
        served.predict(None, rows)
    rows.loc[0, "path_adc"] = "/etc/passwd"
    with pytest.raises(InputError, match="escapes the dataset root"):
        served.predict(None, rows)


def test_a_symlink_pointing_out_of_the_root_is_refused_one_pointing_inside_is_read(served, rows, prepared,
                                                                                  tmp_path) -> None:
    secret = outside_file(prepared, tmp_path)
    links = prepared.root / f"links-{tmp_path.name}"
    links.mkdir()
    (links / "out.nii.gz").symlink_to(secret)
    (links / "in.nii.gz").symlink_to(prepared.root / rows.loc[0, "path_t1"])
    good = served.predict(None, rows)

    rows.loc[0, "path_t1"] = f"{links.name}/in.nii.gz"
    np.testing.assert_allclose(served.predict(None, rows).to_numpy(), good.to_numpy(), rtol=1e-6)
    rows.loc[0, "path_t1"] = f"{links.name}/out.nii.gz"
    with pytest.raises(InputError, match=rf"row 0 .*column 'path_t1': path '{links.name}/out\.nii\.gz' escapes"):
        served.predict(None, rows)


def test_every_refused_row_is_listed_before_any_image_is_read(served, rows, prepared, tmp_path) -> None:
    # row 0's image is truncated: had the model started reading, that would be the error
    broken = prepared.root / f"broken-{tmp_path.name}.nii.gz"
    data = (prepared.root / rows.loc[0, "path_t1"]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    rows = rows.astype(object)
    rows.loc[0, "path_t1"] = broken.name
    rows.loc[1, "path_t2"] = "../x.nii.gz"
    rows.loc[2, "path_adc"] = "nope/missing.nii.gz"
    rows.loc[2, "age"] = "old"
    with pytest.raises(InputError) as err:
        served.predict(None, rows)
    assert len(err.value.problems) == 3
    assert err.value.problems[0].startswith("row 1 ") and "escapes the dataset root" in err.value.problems[0]
    assert err.value.problems[1].startswith("row 2 ") and "'age': 'old' is not a finite number" in str(err.value)
    assert "'path_adc': adc image 'nope/missing.nii.gz' is not a file under" in err.value.problems[2]


def test_an_unreadable_image_names_the_row_and_the_file(served, rows, prepared, tmp_path) -> None:
    broken = prepared.root / f"truncated-{tmp_path.name}.nii.gz"
    data = (prepared.root / rows.loc[2, "path_t2"]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    rows.loc[2, "path_t2"] = broken.name
    pid = rows.loc[2, "patient_id"]
    with pytest.raises(InputError, match=rf"^row 2 \(patient '{pid}'\), column 'path_t2': cannot read t2 image "
                                         rf".*{broken.name}: file is truncated"):
        served.predict(None, rows)


def test_missing_columns_are_named(served, rows) -> None:
    with pytest.raises(InputError, match=r"lack column\(s\) \['path_adc', 'age'\]"):
        served.predict(None, rows.drop(columns=["path_adc", "age"]))


def test_text_values_are_typed_by_the_spec_and_bad_ones_named(served, rows) -> None:
    as_text = rows.astype(str).replace("nan", "")  # what a CSV read as text holds
    np.testing.assert_allclose(served.predict(None, as_text).to_numpy(), served.predict(None, rows).to_numpy(),
                               rtol=1e-6)
    as_text.loc[1, "location"] = "7"
    with pytest.raises(InputError, match=r"^row 1 .*column 'location': '7' is not one of \['1', '2', '3'\]"):
        served.predict(None, as_text)


@pytest.mark.parametrize("column, value", [("age", np.nan), ("age", ""), ("sex", None), ("location", "NA")])
def test_a_missing_value_in_a_required_field_is_refused_as_prepare_refuses_it(served, rows, column, value) -> None:
    rows[column] = rows[column].astype(object)
    rows.loc[1, column] = value
    with pytest.raises(InputError, match=rf"^row 1 .*column '{column}': value .* is missing and field '{column}' "
                                         rf"is not optional$"):
        served.predict(None, rows)


def test_a_constant_volume_is_refused_naming_the_row_and_file(served, rows, prepared, tmp_path) -> None:
    import nibabel as nib

    src = nib.load(prepared.root / rows.loc[0, "path_adc"])
    flat = prepared.root / f"constant-{tmp_path.name}.nii.gz"
    nib.save(nib.Nifti1Image(np.full(src.shape, 300, np.int16), src.affine), flat)
    rows.loc[0, "path_adc"] = flat.name
    with pytest.raises(InputError, match=rf"^row 0 .*column 'path_adc': cannot read adc image .*{flat.name}: "
                                         rf"every non-zero voxel is 300"):
        served.predict(None, rows)


def test_an_image_promising_gigabytes_is_refused_before_decompressing_naming_row_and_file(served, rows, prepared,
                                                                                         tmp_path) -> None:
    bomb = nifti_header_only(prepared.root / f"bomb-{tmp_path.name}.nii.gz", (4096, 4096, 512), np.int16)
    rows.loc[1, "path_t1"] = bomb.name
    pid = rows.loc[1, "patient_id"]
    with pytest.raises(InputError, match=rf"^row 1 \(patient '{pid}'\), column 'path_t1': cannot read t1 image "
                                         rf".*{bomb.name}: the header promises shape \[4096, 4096, 512\] int16: "
                                         rf".* 32 GiB once read as float32, over the limit of 512 MiB per image"):
        served.predict(None, rows)


def test_a_volume_whose_qform_and_sform_disagree_is_refused_naming_row_file_and_codes(served, rows, prepared,
                                                                                      tmp_path) -> None:
    import nibabel as nib

    src = nib.load(prepared.root / rows.loc[0, "path_t2"])
    qform = src.affine.copy()
    qform[:, 0] *= -1  # left-right mirrored
    img = nib.Nifti1Image(np.asarray(src.dataobj), src.affine)
    img.set_qform(qform, code=1)
    img.set_sform(src.affine, code=2)
    conflicting = prepared.root / f"qform-{tmp_path.name}.nii.gz"
    nib.save(img, conflicting)
    rows.loc[0, "path_t2"] = conflicting.name
    with pytest.raises(InputError, match=rf"^row 0 .*column 'path_t2': cannot read t2 image .*{conflicting.name}: its "
                                         rf"qform \(code 1, scanner\) says LAS but its sform \(code 2, aligned\) "
                                         rf"says RAS"):
        served.predict(None, rows)


def test_a_request_cannot_choose_the_root(served, rows, prepared, tmp_path) -> None:
    rows.loc[0, "path_t1"] = str(outside_file(prepared, tmp_path))
    with pytest.raises(InputError, match="takes no parameters"):
        served.predict(None, rows, params={"root": "/"})


def test_the_operators_env_var_moves_the_root_and_confines_to_the_new_one(served, rows, prepared, tmp_path,
                                                                         monkeypatch) -> None:
    moved = Path(shutil.copytree(prepared.root, tmp_path / "moved", ignore=shutil.ignore_patterns("prepared")))
    expected = served.predict(None, rows).to_numpy()
    monkeypatch.setenv(ROOT_ENV, str(moved))
    assert served.data_root == moved.resolve()
    np.testing.assert_allclose(served.predict(None, rows).to_numpy(), expected, rtol=1e-6)
    rows.loc[0, "path_t1"] = str(prepared.root / rows.loc[0, "path_t1"])  # the registered root is outside now
    with pytest.raises(InputError, match="escapes the dataset root"):
        served.predict(None, rows)
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "absent"))
    with pytest.raises(InputError, match=rf"data root .*absent does not exist; set \${ROOT_ENV}"):
        served.predict(None, rows)


def test_a_bundle_holding_pickled_code_is_refused_without_running_it(bundle, tmp_path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = Path(shutil.copytree(bundle, tmp_path / "evil"))
    torch.save([{"model": Payload(), "normalizer": {}}], evil / "models.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        CFCMLModel.from_bundle(evil)
    assert not marker.exists()


def test_the_mlflow_pyfunc_has_no_parameters_and_enforces_the_root(bundle, rows, prepared, tmp_path) -> None:
    from mlflow.models import infer_signature

    served = CFCMLModel.from_bundle(bundle)
    signature = infer_signature(rows, served.predict(None, rows))
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=str(MODEL_CODE), artifacts={"bundle": str(bundle)},
                             signature=signature, input_example=placeholder_example(prepared.spec),
                             pip_requirements=["torch", "mlflow"])
    check_model_code(tmp_path / "model")  # the platform's code, nothing else: predict.py loads it
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert model.metadata.signature.params is None
    np.testing.assert_allclose(model.predict(rows).to_numpy().sum(1), 1.0, rtol=1e-5)
    rows.loc[1, "path_t1"] = str(outside_file(prepared, tmp_path))
    with pytest.raises(InputError, match=r"row 1 .*escapes the dataset root"):
        model.predict(rows)
    # MLflow drops params the signature lacks (with a warning): a "root" sent along changes nothing
    with pytest.raises(InputError, match=r"row 1 .*escapes the dataset root"):
        model.predict(rows, params={"root": "/"})


# ---- calibration, operating points, missing modalities ---------------------------------------------


@pytest.fixture(scope="module")
def calibrated(prepared, tmp_path_factory: pytest.TempPathFactory) -> CFCMLModel:
    """A bundle with a temperature and operating points, trained (as far as the bundle says) with
    modality dropout."""
    from cfcml.evaluation.calibration import Temperature
    from cfcml.evaluation.calibrator import Calibrator
    from cfcml.evaluation.operating_points import OperatingPoint

    base = load_experiment("men")
    experiment = base.replace({**load_search("smoke", base).overrides, "train.image_size": list(SIZE),
                               "train.modality_dropout": 0.2})
    torch.manual_seed(0)
    network = build_model(prepared.spec, experiment.model)
    normalizer = prepared.fit_normalizer(prepared.dev_frame())
    points = [OperatingPoint("youden", "youden", 0, "Grade_1", 0.3, None, 0.8, 0.7, 10)]
    calibrator = Calibrator(Temperature(2.0, 1.0, 0.9, 10), points, "out-of-fold predictions of trial t", 0.9)
    bundle = write_bundle(tmp_path_factory.mktemp("calibrated") / "bundle", spec=prepared.spec, experiment=experiment,
                          members=[FoldWeights(network.state_dict(), normalizer.state_dict())], root=prepared.root,
                          calibrator=calibrator)
    return CFCMLModel.from_bundle(bundle)


def test_predict_returns_calibrated_probabilities_and_the_raw_ones_on_request(calibrated, rows) -> None:
    from cfcml.evaluation.calibration import apply_temperature

    raw = calibrated.predict(None, rows, params={"raw": True}).to_numpy()
    out = calibrated.predict(None, rows).to_numpy()
    np.testing.assert_allclose(out, apply_temperature(raw, 2.0), rtol=1e-5)
    assert (out.argmax(1) == raw.argmax(1)).all() and out.max() <= raw.max() + 1e-9  # softer, same argmax


def test_predict_adds_the_decision_at_a_named_operating_point(calibrated, rows) -> None:
    out = calibrated.predict(None, rows, params={"operating_point": "Grade_1:youden"})
    assert (out["operating_point"] == "Grade_1:youden").all() and (out["threshold"] == 0.3).all()
    assert (out["decision"] == (out["Grade_1"] >= 0.3)).all()
    with pytest.raises(InputError, match="no operating point 'Grade_1:nope'; known: Grade_1:youden"):
        calibrated.predict(None, rows, params={"operating_point": "Grade_1:nope"})


@pytest.mark.parametrize("modality", ["t1", "adc"])
def test_a_missing_modality_is_accepted_only_by_a_model_trained_for_it(served, calibrated, rows, modality) -> None:
    rows.loc[rows.index[0], f"path_{modality}"] = ""
    out = calibrated.predict(None, rows)  # trained with modality dropout: a zero image
    np.testing.assert_allclose(out.to_numpy().sum(1), 1.0, rtol=1e-5)
    with pytest.raises(InputError, match=rf"no {modality} image given; this model was trained without modality "
                                         r"dropout \(train.modality_dropout = 0\)"):
        served.predict(None, rows)


def test_a_missing_optional_field_is_accepted(served, rows) -> None:
    rows = rows.astype({"adc_value": object})
    rows.loc[rows.index[0], "adc_value"] = ""
    rows.loc[rows.index[1], "tumour_area"] = None
    out = served.predict(None, rows)
    np.testing.assert_allclose(out.to_numpy().sum(1), 1.0, rtol=1e-5)


def _files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def test_a_registered_model_is_loaded_from_code_with_no_patient_in_its_example(prepared, bundle, rows, tmp_path,
                                                                               monkeypatch) -> None:
    """Registration logs the model from code (no pickle to run at load) and an input example of
    placeholders: no patient id, image path or clinical value of the data leaves with the model."""
    import json

    import yaml
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    served = CFCMLModel.from_bundle(bundle)
    (state,) = torch.load(bundle / "models.pt", weights_only=True)
    info = log_and_register(tracking_uri=uri, run_id=run_id, prepared=prepared, experiment=served.experiment,
                            members=[FoldWeights(state["model"], state["normalizer"])], model_name="m", tags={"a": "b"},
                            pip_requirements=["torch", "mlflow"])
    assert str(info.registered_model_version) == "1"
    local = Path(mlflow.artifacts.download_artifacts("models:/m/1", tracking_uri=uri, dst_path=str(tmp_path / "dl")))
    # models-from-code: the MLmodel names the code file; no pickled python model anywhere
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == "served_model_code.py" and "python_model" not in flavor
    assert not [p for p in _files(local) if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert (local / "code" / "tuning" / "release" / "served_model.py").is_file()

    # the example: placeholders only
    example_text = "".join(p.read_text() for p in _files(local) if "example" in p.name)
    assert example_text and "example-1" in example_text
    manifest = prepared.manifest
    for pid in manifest["patient_id"]:
        assert str(pid) not in example_text
    for column in [c for c in manifest.columns if c.startswith("path_")]:
        for path in manifest[column]:
            assert str(path) not in example_text and Path(path).name not in example_text
    example = pd.DataFrame(**json.loads((local / "input_example.json").read_text()))
    numeric = [f.name for f in prepared.spec.fields if f.kind == "numeric"]
    assert set(example[numeric].stack().dropna().astype(float)) <= {0.0}

    # loading imports the project's class (pickle refused outright) and predicts as the bundle does
    check_model_code(local)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(str(local))
    assert type(model.unwrap_python_model()).__module__ == "tuning.release.served_model"
    np.testing.assert_allclose(model.predict(rows).to_numpy(), served.predict(None, rows).to_numpy(), rtol=1e-6)


def test_a_cloudpickled_model_is_refused_before_its_pickle_is_loaded(bundle, tmp_path) -> None:
    """How models were logged before models-from-code: the python model pickled into the folder."""
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=CFCMLModel(), artifacts={"bundle": str(bundle)},
                             pip_requirements=["torch", "mlflow"])
    with pytest.raises(UntrustedModelError) as info:
        check_model_code(tmp_path / "model", name="model m")
    assert str(info.value) == ("model m: python_model.pkl is a pickled python model, not the platform's served-model "
                               "code: unpickling it would run whatever code it holds; refused before loading "
                               "anything of it (pass --trust-model-code to run a model's own code)")


def test_the_declared_requirements_cover_everything_the_served_model_imports() -> None:
    """A fresh interpreter that loads the served model's code imports only distributions that pip
    installs from `served_requirements()` (the listed ones and what they require), the standard
    library and the platform's own code; each is pinned at its installed version, local label off."""
    import importlib.metadata as md
    import json
    import re
    import subprocess
    import sys

    from cfcml.config import PROJECT_ROOT
    from tuning.release.served_model import SERVED_PACKAGES, served_requirements

    probe = ("import sys, json, importlib.metadata as md\nimport tuning.release.served_model_code\n"
             "names = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
             "dist = md.packages_distributions()\n"
             "print(json.dumps(sorted(dist.get(n, []) for n in names if n in dist)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                       cwd=PROJECT_ROOT).stdout.strip().splitlines()[-1])

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    installed, todo = set(), [norm(n) for n in SERVED_PACKAGES]
    while todo:
        name = todo.pop()
        if name in installed:
            continue
        installed.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    installed.add("cfcml")
    # a top-level name shared by several distributions (a namespace: google, opentelemetry) needs one of them
    missing = [dists for dists in loaded if not {norm(d) for d in dists} & installed]
    assert not missing, f"imported by the served model but not required: {missing}"
    pins = served_requirements()
    assert [p.split("==")[0] for p in pins] == list(SERVED_PACKAGES)
    assert all("+" not in p.split("==")[1] for p in pins)
