"""The registered model: an MLflow pyfunc wrapping preprocessing, the tabular normaliser(s) and
one or more CFCML state dicts.

Why pyfunc and not the pytorch flavour: the network takes several image tensors plus three
tabular tensors, and a user holds manifest rows (file paths + clinical fields), not tensors.
The pyfunc takes a DataFrame of manifest rows, reads and preprocesses the images exactly as
`prepare` does, normalises the table with the training statistics shipped inside the model,
and returns class probabilities; its signature describes those columns. A fold ensemble (the
best trial's K models, each with its own fold's normaliser) averages probabilities.

Confinement: a served model opens the files its input rows name, so a caller must not be able to
name any file. Every image path is resolved (symlinks followed) under ONE data root: the one
recorded at registration, or the one the server's operator sets in `$CFCML_DATA_ROOT`; a request
cannot choose it (the model takes no parameters). A path that escapes the root (`..`, an
absolute path elsewhere, a symlink pointing out) is refused, naming the row, before any image is
read. `CFCMLModel.predict` always runs this check, so no caller (REST server, `mlflow.pyfunc`,
`pipelines/predict.py`) can skip it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.pyfunc import PythonModel  # what `mlflow.pyfunc.PythonModel` names at class creation

from cfcml.config import PROJECT_ROOT, ExperimentConfig
from cfcml.networks import build_trained
from tuning.records.checkpoints import FoldWeights

if TYPE_CHECKING:
    import logging

    from mlflow.models.model import ModelInfo

    from cfcml.data.dataset import RawDataset
    from cfcml.data.manifest import PreparedDataset
    from cfcml.data.normalize import TabularNormalizer
    from cfcml.data.spec import DatasetSpec
    from cfcml.data.validation import CheckedImage
    from cfcml.evaluation.calibrator import Calibrator

BUNDLE_STATE = "models.pt"
BUNDLE_META = "bundle.json"
ROOT_ENV = "CFCML_DATA_ROOT"  # the operator's override of the registered data root (server side)
MAX_LISTED = 20  # problems listed in one InputError; the rest are counted
PARAMS = {"raw": False, "operating_point": ""}  # what `predict` takes, with their defaults


class InputError(ValueError):
    """Input rows the model refuses. Each problem names the row (position and patient id), the
    column and the offending path or value; `problems` holds them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            listed = self.problems[:MAX_LISTED]
            more = len(self.problems) - len(listed)
            message = f"{len(self.problems)} problems in the input rows:\n  " + "\n  ".join(listed)
            message += f"\n  ... and {more} more" if more else ""
        super().__init__(message)


def input_columns(spec: DatasetSpec) -> list[str]:
    return ["patient_id"] + [f"path_{m.name}" for m in spec.modalities] + [f.name for f in spec.fields]


def data_root(registered: str | Path) -> Path:
    """The folder every image path must resolve inside: `$CFCML_DATA_ROOT` when the operator sets
    it (e.g. the data moved since registration), else the root recorded at registration."""
    return Path(os.environ.get(ROOT_ENV) or registered).expanduser().resolve()


def row_name(frame: pd.DataFrame, i: int) -> str:
    """'row <index label> (patient <id>)' for the i-th row: what every error calls a row."""
    label = frame.index[i]
    name = f"{frame.index.name or 'row'} {label}"
    if "patient_id" in frame.columns and not _blank(frame["patient_id"].iloc[i]):
        name += f" (patient {str(frame['patient_id'].iloc[i])!r})"
    return name


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def check_rows(model_input: pd.DataFrame, spec: DatasetSpec, root: str | Path,
               missing_modalities: bool = False) -> tuple[pd.DataFrame, list[list[Path | None]]]:
    """The one check every prediction starts with, before any image is read. Returns the input
    columns typed the way the normaliser reads them (numeric float, the spec's missing tokens and
    blanks -> NaN; categorical text, missing -> None) and, per row and modality, the absolute
    image path resolved (symlinks followed) inside `root`.

    InputError naming the missing columns; or listing every row (position and patient id) whose
    value is not a number or not a category, is missing in a field that is not optional (prepare's
    validation.check_field_value), or whose image path is blank, escapes `root` (`..`,
    an absolute path elsewhere, a symlink pointing out) or names no file. Already typed rows (a
    manifest) pass unchanged; text rows (a CSV read as text, JSON) are converted.

    missing_modalities: a blank image path is accepted (None in the returned paths: the modality
    is withheld as a zero image) - only for a model trained with `train.modality_dropout` > 0;
    otherwise a blank path is refused with that reason."""
    needed = [c for c in input_columns(spec) if c != "patient_id"]
    missing = [c for c in needed if c not in model_input.columns]
    if missing:
        raise InputError([f"input rows lack column(s) {missing}; expected manifest rows with the columns "
                          f"{input_columns(spec)}"])
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError([f"the data root {root} does not exist; set ${ROOT_ENV} on the server to the folder "
                          f"the image paths are relative to"])
    frame = model_input[[c for c in input_columns(spec) if c in model_input.columns]].copy()
    files, path_problems = _confine_paths(frame, spec, root, missing_modalities)
    problems = _type_fields(frame, spec) + path_problems
    if problems:
        raise InputError([message for _, message in sorted(problems, key=lambda p: p[0])])  # by row
    return frame, files


def _type_fields(frame: pd.DataFrame, spec: DatasetSpec) -> list[tuple[int, str]]:
    """Type the clinical columns of `frame` in place; (row position, problem) for each bad value.
    The same check prepare applies (validation.check_field_value): a blank or missing token in a
    field that is not optional is refused, since no missing token for it was ever trained."""
    from cfcml.data.validation import check_field_value

    problems = []
    for f in spec.fields:
        values: list[Any] = []
        for i, value in enumerate(frame[f.name].tolist()):
            typed, problem = check_field_value(value, f, spec)
            if problem is not None:
                problems.append((i, f"{row_name(frame, i)}, column {f.name!r}: {problem[1]}"))
            values.append(typed)
        frame[f.name] = pd.Series(values, index=frame.index, dtype=float if f.kind == "numeric" else object)
    return problems


def _confine_paths(frame: pd.DataFrame, spec: DatasetSpec, root: Path,
                   missing_modalities: bool = False) -> tuple[list[list[Path | None]], list[tuple[int, str]]]:
    """Every image path of `frame` resolved inside `root` (per row, per modality), and (row
    position, problem) for each blank, escaping or missing one. Nothing is read."""
    from cfcml.data.validation import check_path

    files: list[list[Path | None]] = []
    problems = []
    for i in range(len(frame)):
        row: list[Path | None] = []
        for m in spec.modalities:
            column = f"path_{m.name}"
            rel = frame[column].iloc[i]
            where = f"{row_name(frame, i)}, column {column!r}"
            if _blank(rel):
                if missing_modalities:  # trained with modality dropout: withheld as a zero image
                    row.append(None)
                else:
                    problems.append((i, f"{where}: no {m.name} image given; this model was trained without "
                                        f"modality dropout (train.modality_dropout = 0), so it needs every image"))
                continue
            try:  # the same check prepare applies to a dataset (its `path_escape` problem)
                path = check_path(root, str(rel))
            except ValueError as exc:
                problems.append((i, f"{where}: {exc}; refused"))
                continue
            except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
                problems.append((i, f"{where}: path {str(rel)!r} cannot be resolved ({exc}); refused"))
                continue
            if not path.is_file():
                problems.append((i, f"{where}: {m.name} image {str(rel)!r} is not a file under {root}"))
                continue
            row.append(path)
        files.append(row)
    return files, problems


def _confined_dataset(frame: pd.DataFrame, spec: DatasetSpec, root: Path, files: list[list[Path | None]],
                      names: list[str], normalizer: TabularNormalizer) -> RawDataset:
    """A RawDataset over `frame` that reads the absolute `files` `check_rows` confined to `root`
    (not the rows' paths again) and names the row and file when one cannot be decoded."""
    from cfcml.data.dataset import RawDataset
    from cfcml.data.images import preprocess

    class ConfinedRawDataset(RawDataset):
        def _load(self, i: int) -> list[np.ndarray]:
            checked, problems, _ = _check_row_images(self.spec, files[i], names[i])
            if problems:
                raise InputError(problems)
            return [np.zeros((m.channels, *m.size), np.float32) if c is None  # a withheld modality
                    else preprocess(c.array, m, self.spec.intensity) for m, c in zip(self.spec.modalities, checked)]

    return ConfinedRawDataset(frame, spec, root, normalizer)


def _check_row_images(spec: DatasetSpec, files: list[Path | None], name: str
                      ) -> tuple[list[CheckedImage | None], list[str], list[str]]:
    """(checked images, problems, warnings) of one row's confined image files: prepare's own
    image check (validation.check_image: decodable, right shape, not constant) and its voxel-grid
    check across the row's modalities."""
    from cfcml.data.images import ImageError
    from cfcml.data.validation import check_image, geometry_problem

    checked: list[CheckedImage | None] = []
    problems, warnings = [], []
    for m, path in zip(spec.modalities, files):
        if path is None:  # a withheld modality (check_rows allowed it)
            checked.append(None)
            continue
        where = f"{name}, column 'path_{m.name}'"
        try:
            c = check_image(path, m, spec)
        except (ImageError, OSError) as exc:
            problems.append(f"{where}: cannot read {m.name} image {path}: {exc}")
            continue
        warnings += [f"{where}: {m.name} image {path}: {text}" for _, text in c.warnings]
        checked.append(c)
    given = {m.name: c.geometry for m, c in zip(spec.modalities, checked) if c is not None}
    if not problems and (why := geometry_problem(given)):
        problems.append(f"{name}: {why} ({', '.join(str(p) for p in files if p is not None)})")
    return checked, problems, warnings


def check_images(frame: pd.DataFrame, spec: DatasetSpec, files: list[list[Path | None]]) -> list[str]:
    """Every row's images read and checked as prepare checks them, before any prediction (the
    command line's up-front pass; `predict` checks each row again as it reads it). Returns the
    warnings (clip saturation); InputError listing every refused image."""
    problems, warnings = [], []
    for i, row_files in enumerate(files):
        _, p, w = _check_row_images(spec, row_files, row_name(frame, i))
        problems += p
        warnings += w
    if problems:
        raise InputError(problems)
    return warnings


class CFCMLModel(PythonModel):
    """The served model: the MLflow pyfunc every registered CFCML model is (logged from code,
    `served_model_code.py`; nothing pickled), loaded from its bundle (`write_bundle`) by
    `load_context`, or without MLflow by `from_bundle`.

    After loading it holds:
        spec: the dataset spec (`cfcml.data.spec.DatasetSpec`): classes, modalities, fields.
        experiment: the configuration it was trained with (`cfcml.config.ExperimentConfig`).
        root: the data root recorded at registration; images are read only inside it, or inside
            $CFCML_DATA_ROOT when the serving operator sets it (`data_root`).
        members: (network, tabular normaliser) pairs: one for a final model, one per fold for a
            fold ensemble; their probabilities are averaged.
        calibrator: temperature and operating points fitted on out-of-fold predictions
            (`cfcml.evaluation.calibrator.Calibrator`); None for a model registered without them.

    `predict` returns calibrated class probabilities; its parameters (`PARAMS`, the only ones
    taken): `raw` true returns the network's own probabilities, `operating_point` ('<class>:<name>',
    or the name alone for a binary task) adds `operating_point`, `threshold` and `decision` (the
    class's calibrated probability >= the threshold) columns."""

    @classmethod
    def from_bundle(cls, bundle: str | Path) -> CFCMLModel:
        """The model straight from a bundle folder (`write_bundle`), without MLflow."""
        model = cls()
        model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
        return model

    def load_context(self, context: Any) -> None:
        """Load the bundle MLflow hands over as the artifact "bundle" (weights with
        `weights_only=True`: tensors only).

        Args:
            context: MLflow's `PythonModelContext` (or anything with `artifacts["bundle"]`, a folder).

        Raises:
            OSError: a bundle file is missing or unreadable; cfcml.config.ConfigError: its spec or
                configuration is not a valid one.
        """
        import importlib

        from cfcml.config import ExperimentConfig, from_dict
        from cfcml.data.normalize import TabularNormalizer
        from cfcml.data.spec import spec_from_dict

        # What `predict` reads images with, imported now: MLflow infers a logged model's requirements
        # from the modules its loading imports (the placeholder input example cannot be predicted).
        for module in ("cfcml.data.dataset", "cfcml.predict", "nibabel", "PIL.Image"):
            importlib.import_module(module)

        bundle = Path(context.artifacts["bundle"])
        meta = json.loads((bundle / BUNDLE_META).read_text(encoding="utf-8"))
        self.spec = spec_from_dict(meta["spec"], "model bundle spec")
        self.root = meta["root"]
        self.experiment = from_dict(ExperimentConfig, meta["experiment"], "model bundle experiment")
        states = torch.load(bundle / BUNDLE_STATE, map_location="cpu", weights_only=True)
        self.members = [(build_trained(self.spec, self.experiment.model, state["model"]),
                         TabularNormalizer.from_state(self.spec, state["normalizer"])) for state in states]
        from cfcml.evaluation.calibrator import Calibrator

        self.calibrator = Calibrator.from_dict(meta["calibration"]) if meta.get("calibration") else None

    @property
    def accepts_missing_modalities(self) -> bool:
        """Whether a row may leave an image path blank: only a model trained with modality dropout."""
        return self.experiment.train.modality_dropout > 0

    @property
    def data_root(self) -> Path:
        """The folder every image path must resolve inside (`data_root`: $CFCML_DATA_ROOT, else `root`)."""
        return data_root(self.root)

    def check_input(self, model_input: pd.DataFrame) -> tuple[pd.DataFrame, list[list[Path | None]]]:
        """(typed rows, confined absolute image paths) or InputError; `predict` starts with this."""
        return check_rows(model_input, self.spec, self.data_root, self.accepts_missing_modalities)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Class probabilities for each row, averaged over the members, calibrated by the stored
        temperature unless `raw`.

        Args:
            context: MLflow's context (unused: everything was loaded by `load_context`).
            model_input: one row per patient: patient_id, path_<modality> (relative to the data
                root; a blank one only for a model trained with modality dropout) and the clinical
                fields (blank or a missing token = missing); values as text or typed.
            params: at most `PARAMS`: {"raw": bool, "operating_point": "<class>:<name>"}.

        Returns:
            A DataFrame on `model_input`'s index: one float column per class (rows sum to 1), and
            with `operating_point` also `operating_point`, `threshold` and `decision` (bool).

        Raises:
            InputError: every bad row at once (a missing column, a value outside the spec, an image
                path that leaves the data root or is not a file), before any image is read; an
                image that does not read as its modality's (prepare's checks), as it is read;
                another parameter, or an operating point the model does not have.
        """
        from torch.utils.data import DataLoader

        from cfcml.predict import predict_proba

        params = dict(params or {})
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:  # the root in particular: a request must not choose which folder is read
            raise InputError([f"this model takes no parameters other than {sorted(PARAMS)} (got {unknown}); image "
                              f"paths are resolved under the data root fixed at registration or ${ROOT_ENV} on the "
                              "server"])
        point = None
        if params.get("operating_point"):
            if self.calibrator is None:
                raise InputError(["this model was registered without operating points"])
            try:
                point = self.calibrator.point(str(params["operating_point"]))
            except KeyError as exc:
                raise InputError([str(exc.args[0])]) from None
        root = self.data_root  # read once per call: every file below was confined to this one
        frame, files = check_rows(model_input, self.spec, root, self.accepts_missing_modalities)
        names = [row_name(frame, i) for i in range(len(frame))]
        probs = np.zeros((len(frame), len(self.spec.classes)))
        for model, normalizer in self.members:
            loader = DataLoader(_confined_dataset(frame, self.spec, root, files, names, normalizer), batch_size=8)
            probs += predict_proba(model, loader, "cpu", len(self.spec.classes)) / len(self.members)
        calibrated = self.calibrator.temperature.apply(probs) if self.calibrator is not None else probs
        out = pd.DataFrame(probs if params.get("raw") else calibrated, columns=list(self.spec.classes),
                           index=frame.index)
        if point is not None:  # thresholds were fitted on calibrated probabilities: applied to them
            out["operating_point"] = point.key
            out["threshold"] = point.threshold
            out["decision"] = point.decide(calibrated)
        return out


def write_bundle(directory: str | Path, *, spec: DatasetSpec, experiment: ExperimentConfig, members: list[FoldWeights],
                 root: str | Path, calibrator: Calibrator | None = None) -> Path:
    """Write the model bundle into `directory`: the member weights (tensors only, so they load with
    `weights_only=True`) and bundle.json (spec, experiment, and `root`: the only folder the model
    reads images from, unless the serving operator sets $CFCML_DATA_ROOT; `calibration`: the
    calibrator's temperature and operating points, when given)."""
    from cfcml.data.spec import spec_to_dict

    bundle = Path(directory)
    bundle.mkdir(parents=True, exist_ok=True)
    torch.save([{"model": m.model, "normalizer": m.normalizer} for m in members], bundle / BUNDLE_STATE)
    (bundle / BUNDLE_META).write_text(json.dumps({
        "spec": spec_to_dict(spec), "experiment": experiment.to_dict(), "root": str(Path(root).resolve()),
        "calibration": calibrator.to_dict() if calibrator is not None else None,
    }, default=str), encoding="utf-8")
    return bundle


MODEL_CODE = Path(__file__).with_name("served_model_code.py")  # the registered model's code (models-from-code)
PYFUNC_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")  # MLflow's python-model loaders
PLATFORM_PACKAGES = ("cfcml", "tuning")  # what log_and_register ships in a model's code/ folder
TRUST_FLAG = "--trust-model-code"
# The distributions the served model's code imports directly (cfcml/ and tuning/ travel as its code
# paths); pip installs what they require. tests/tuning/release/test_served_model.py checks that a
# fresh interpreter importing the served model loads nothing outside them and their requirements.
SERVED_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "scipy", "matplotlib", "monai", "mambapy",
                   "einops", "nibabel", "pillow", "pyyaml", "tqdm")


def served_requirements() -> list[str]:
    """`SERVED_PACKAGES` pinned at their installed versions (`name==version`, a local label such as
    torch's `+cpu` dropped, so that a GPU server resolves its own build), in the order listed: the
    registered model's `requirements.txt`. What MLflow would infer without it (it loads the model in
    a subprocess to see what it imports, ~20 s per registration), declared instead."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVED_PACKAGES]


class UntrustedModelError(ValueError):
    """A model folder whose loading would run code that is not the platform's own; str() is one
    line naming the file (relative to the folder)."""


def check_model_code(folder: str | Path, name: str | None = None) -> None:
    """Refuse a model folder whose loading (`mlflow.pyfunc.load_model`) would run code other than
    the platform's, before anything of it is imported or unpickled; reads only `MLmodel` (YAML,
    safe_load) and compares files by content.

    The platform's models (`log_and_register`) pass: MLmodel's python_function flavour loads with
    MLflow's own loader (`mlflow.pyfunc.loaders.code_model`, or `mlflow.pyfunc.model`) from code
    (`model_code_path`, no pickled `python_model`), that code file is byte-identical (SHA-256) to
    this platform's `served_model_code.py`, and the `code/` folder holds only the `cfcml` and
    `tuning` packages (already imported in this process, as this module imports them, so the
    copies are never imported: the platform's own modules serve the model).

    Raises UntrustedModelError for: an unreadable or non-mapping MLmodel, no python_function
    flavour, another loader module, a pickled python model, a code file that differs from
    `served_model_code.py` (or is missing), anything else in the code folder (a module there would
    be imported ahead of the installed packages). `name`: what the message calls the model
    (default "model folder <folder>"), e.g. the models:/ URI it was downloaded from."""
    folder = Path(folder)
    refuse = _refuser(name or f"model folder {folder}")
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise refuse("MLmodel", f"cannot be read as YAML ({str(exc).splitlines()[0]})") from None
    flavor = ((meta or {}).get("flavors") or {}).get("python_function") if isinstance(meta, dict) else None
    if not isinstance(flavor, dict):
        raise refuse("MLmodel", "has no python_function flavour")
    if flavor.get("loader_module") not in PYFUNC_LOADERS:
        raise refuse("MLmodel", f"names loader module {flavor.get('loader_module')!r}, not MLflow's "
                                f"{PYFUNC_LOADERS[0]!r}: importing it would run code of its own")
    if not flavor.get("model_code_path"):
        pickled = flavor.get("python_model") or "its python model"
        raise refuse(str(pickled), "is a pickled python model, not the platform's served-model code: unpickling it "
                                   "would run whatever code it holds")
    data = folder / str(flavor["data"]) if flavor.get("data") else folder  # where MLflow looks for the code
    code = data / Path(str(flavor["model_code_path"])).name
    rel = os.path.relpath(code, folder)
    if not code.is_file():
        raise refuse(rel, "(the model's code file, named by MLmodel) does not exist")
    if hashlib.sha256(code.read_bytes()).digest() != hashlib.sha256(MODEL_CODE.read_bytes()).digest():
        raise refuse(rel, "is not the platform's served-model code (its content differs from "
                          "tuning/release/served_model_code.py)")
    if flavor.get("code"):
        code_dir = folder / str(flavor["code"])
        for entry in sorted(code_dir.iterdir()) if code_dir.is_dir() else []:
            if not (entry.name in PLATFORM_PACKAGES and entry.is_dir()):
                raise refuse(os.path.relpath(entry, folder),
                             f"is not one of the platform's packages {list(PLATFORM_PACKAGES)}: loading would put it "
                             "ahead of the installed packages")


def _refuser(name: str) -> Callable[[str, str], UntrustedModelError]:
    def refuse(file: str, why: str) -> UntrustedModelError:
        return UntrustedModelError(f"{name}: {file} {why}; refused before loading anything of it "
                                   f"(pass {TRUST_FLAG} to run a model's own code)")
    return refuse


def placeholder_example(spec: DatasetSpec) -> pd.DataFrame:
    """Two rows of the model's input columns holding made-up values, for the registered model's
    input example: no patient's id, file path or clinical value leaves with a model. Ids
    `example-1`/`example-2`, paths `images/example-<i>_<modality>.<ext>`; numeric fields 0.0 then
    missing (NaN), categorical fields the config's first category then missing (None): the
    signature says which columns are text, which are numbers and that fields may be blank."""
    rows = []
    for i in (1, 2):
        row: dict[str, Any] = {"patient_id": f"example-{i}"}
        for m in spec.modalities:
            row[f"path_{m.name}"] = f"images/example-{i}_{m.name}.{'nii.gz' if m.dims == 3 else 'jpg'}"
        for f in spec.fields:
            if f.kind == "numeric":
                row[f.name] = 0.0 if i == 1 else float("nan")
            else:
                row[f.name] = f.categories[0] if i == 1 else None
        rows.append(row)
    return pd.DataFrame(rows, columns=input_columns(spec))


class _NoExampleValidation:
    """MLflow predicts on a logged input example, to validate it and to infer requirements; the
    placeholder rows name no real image, so those predictions fail by design. Drop MLflow's
    warnings about them (the bundle was checked on real rows before logging, and `load_context`
    imports every module `predict` needs)."""

    LOGGERS = ("mlflow.models.model", "mlflow.utils.requirements_utils")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Failed to validate serving input example",
                                       "Failed to run predict on input_example"))


def log_and_register(
    *,
    tracking_uri: str,
    run_id: str,
    prepared: PreparedDataset,
    experiment: ExperimentConfig,
    members: list[FoldWeights],
    model_name: str,
    tags: dict[str, str],
    pip_requirements: list[str] | None = None,
    calibrator: Calibrator | None = None,
) -> ModelInfo:
    """Log the bundle (`members`: one network per fold, averaged) as a pyfunc model on `run_id`
    and register it as `model_name`. The bundle records `prepared.root` as the data root.

    The model is logged from code (`served_model_code.py`, MLflow's models-from-code): loading it
    imports `tuning.release.served_model` from the model's code paths; nothing is unpickled. Its input
    example is `placeholder_example` (no patient data); the bundle is first checked on two real
    development rows, which are not logged.

    pip_requirements: the model's requirements; default `served_requirements()`."""
    import logging

    from mlflow.models import infer_signature

    spec = prepared.spec
    example = placeholder_example(spec)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(Path(tmp) / "bundle", spec=spec, experiment=experiment, members=members,
                              root=prepared.root, calibrator=calibrator)
        real = prepared.dev_frame()[input_columns(spec)].head(2).reset_index(drop=True)
        output = CFCMLModel.from_bundle(bundle).predict(None, real)  # exactly what serving will run
        # params: raw / operating_point only; none can pick the data root
        signature = infer_signature(example, output, params=dict(PARAMS))
        quiet = _NoExampleValidation()
        for name in quiet.LOGGERS:
            logging.getLogger(name).addFilter(quiet)
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(MODEL_CODE),
                    artifacts={"bundle": str(bundle)},
                    signature=signature,
                    input_example=example,
                    code_paths=[str(PROJECT_ROOT / "cfcml"), str(PROJECT_ROOT / "tuning")],
                    registered_model_name=model_name,
                    pip_requirements=served_requirements() if pip_requirements is None else pip_requirements,
                )
        finally:
            for name in quiet.LOGGERS:
                logging.getLogger(name).removeFilter(quiet)
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return info
