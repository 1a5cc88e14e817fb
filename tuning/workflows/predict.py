"""The predict command's one function (`pipelines/predict.py`): `predict_file`, and the steps it
is made of: `load_model` (refusing a model whose code is not this platform's own, unless trusted),
`operating_params`, `read_rows` and `predict_rows`. A problem the user can fix is a `PredictError`
(one line, exit status 2 in `tuning.cli.shell`); `predict_file` turns the served model's own
`InputError`s into one.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.pyfunc import PyFuncModel

    from cfcml.data.spec import DatasetSpec
    from tuning.release.served_model import CFCMLModel


class PredictError(Exception):
    """A problem the user can fix; printed as one `error:` line, exit status 2."""


def predict_file(model_uri: str, rows: Path, out: Path, *, data_root: Path | None = None, runs_dir: Path,
                 tracking_uri: str | None = None, batch_rows: int = 32, raw: bool = False,
                 operating_point: str | None = None, trust_model_code: bool = False) -> pd.DataFrame:
    """Class probabilities for every row of `rows` by the model at `model_uri`, written to `out`
    (atomically: a failed write leaves neither half-written predictions nor a temporary file).

    Args:
        model_uri: models:/<name>/<version|alias|latest>, runs:/<run id>/model, or a local model folder.
        rows: the CSV of manifest rows (the model's input columns).
        out: the CSV to write: patient_id, prob_<class>..., predicted (and the operating point's
            threshold and decision with `operating_point`).
        data_root: the folder the image paths are relative to (the operator's override, as
            $CFCML_DATA_ROOT); None: $CFCML_DATA_ROOT, else the data root recorded at registration.
        runs_dir: where the default MLflow store lives (<runs-dir>/mlflow.db).
        tracking_uri: MLflow for models:/ and runs:/ URIs (None: $MLFLOW_TRACKING_URI or runs_dir's).
        batch_rows: rows per model call (the progress bar's step), at least 1.
        raw: the network's own probabilities, not the calibrated ones.
        operating_point: "<class>:<name>" (the name alone for a binary task): add its decision.
        trust_model_code: load a model whose code is not this platform's own served-model code.

    Returns:
        The predictions written (a pandas DataFrame, one row per input row).

    Raises:
        PredictError: anything the user can fix (rows, model, operating point, --out), including
            a row or image the model refuses (`tuning.release.served_model.InputError`), rows that
            do not match the model's input schema and a write that failed.
        cfcml.outputs.OutputPathError: `out` cannot be written where it is.
    """
    if batch_rows < 1:
        raise PredictError("--batch-rows must be at least 1")
    from mlflow.exceptions import MlflowException

    from cfcml.data.images import max_image_bytes
    from cfcml.outputs import OutputPathError, atomic_write, check_output_file
    from tuning.release.served_model import ROOT_ENV, InputError

    # --data-root is the operator's override, read by the model as a server reads $CFCML_DATA_ROOT
    root = str(data_root.resolve()) if data_root is not None else os.environ.get(ROOT_ENV)
    try:
        if not rows.is_file():  # before the model loads: the quick mistakes first
            raise PredictError(f"rows file {rows} does not exist")
        try:
            max_image_bytes()
        except ValueError as exc:
            raise PredictError(str(exc)) from None
        check_output_file(out, inputs=[rows], what="--out")
        with _environ(ROOT_ENV, root):
            model, python_model = load_model(model_uri, tracking_uri, runs_dir, trust_model_code)
            params = operating_params(python_model, raw, operating_point)
            frame = read_rows(rows, python_model.spec)
            print(f"{len(frame)} rows from {rows}; images under {python_model.data_root}")
            predictions = predict_rows(model, python_model, frame, batch_rows, out=out, params=params)
        # a failed write leaves neither half-written predictions nor a temporary file
        atomic_write(out, lambda tmp: predictions.to_csv(tmp, index=False))
    except (PredictError, OutputPathError):
        raise
    except InputError as exc:  # a row or image the model refuses, named
        raise PredictError(str(exc)) from None
    except MlflowException as exc:  # the input schema check MLflow runs before the model
        raise PredictError(f"the rows do not match the model's input schema: {exc.message}") from None
    except OSError as exc:  # e.g. the disk filled up while writing
        raise PredictError(f"cannot write --out {out}: {exc}") from None
    return predictions


def load_model(uri: str, tracking_uri: str | None, runs_dir: Path,
               trust_code: bool = False) -> tuple[PyFuncModel, CFCMLModel]:
    """(pyfunc model, its CFCMLModel) from a models:/ or runs:/ URI or a local folder.

    Unless `trust_code`, the model folder (a registry's or a run's model is downloaded first) must
    pass `served_model.check_model_code` (the platform's own served-model code, nothing else)
    before MLflow loads it, and it loads with pickle deserialisation off
    ($MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false); PredictError otherwise. `trust_code`: MLflow
    loads the folder as it is, running its code and pickles."""
    import shutil
    import tempfile

    import mlflow

    from tuning.release.served_model import UntrustedModelError, check_model_code

    local = not uri.startswith(("models:/", "runs:/")) and "://" not in uri
    if local:  # a local model folder
        path = Path(uri).expanduser()
        if not (path / "MLmodel").is_file():
            raise PredictError(f"model folder {path} not found (no {path / 'MLmodel'})")
        where = str(path.resolve())
        uri = str(path.resolve())
    else:
        from tuning.tracking.store import default_tracking_uri

        tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
        mlflow.set_tracking_uri(tracking_uri)
        where = f"{uri} (tracking URI {tracking_uri})"
    download = None if local or trust_code else Path(tempfile.mkdtemp(prefix="cfcml-model-"))
    path_before = list(sys.path)
    try:
        if download is not None:  # checked where it lies, then loaded from there (quietly, as load_model did)
            with _environ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
                uri = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download),
                                                          tracking_uri=tracking_uri)
        if not trust_code:
            check_model_code(uri, name=None if local else f"model {where}")
        with contextlib.nullcontext() if trust_code else _environ("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false"):
            model = mlflow.pyfunc.load_model(uri)
    except UntrustedModelError as exc:
        raise PredictError(str(exc)) from None
    except Exception as exc:  # MlflowException, OSError, ...: one line, not a traceback
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PredictError(f"model {where} not found or not loadable: {detail}") from None
    finally:  # MLflow put the model's code/ folder first on sys.path: nothing more is imported from it
        if not trust_code:  # (a trusted model may import its own modules as it predicts)
            sys.path[:] = path_before
        if download is not None:  # everything was read into memory by load_context
            shutil.rmtree(download, ignore_errors=True)
    python_model = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    if not hasattr(python_model, "check_input"):
        raise PredictError(f"model {where} is not a CFCML model (no CFCML pyfunc inside)")
    return model, cast("CFCMLModel", python_model)  # (the model's own copy of the class, from its code folder)


def read_rows(path: Path, spec: DatasetSpec) -> pd.DataFrame:
    """The CSV as text (categories stay "1", not 1.0; blanks stay blank), read by prepare's reader
    (`read_text_csv`: duplicate header names refused, blank rows skipped with a note); the served
    model types the values by the spec. The index is the file line each record starts on: every
    error names it."""
    from cfcml.data.adapters import TableError, blank_rows_note, read_text_csv
    from tuning.release.served_model import input_columns

    if not path.is_file():
        raise PredictError(f"rows file {path} does not exist")
    try:  # prepare's own reader: header spaces, BOM, CRLF and padded values read as prepare reads them
        frame = read_text_csv(path)
    except TableError as exc:
        raise PredictError(f"{path}: {exc}") from None
    except OSError as exc:
        raise PredictError(f"cannot read {path}: {exc.strerror or exc}") from None
    if frame.attrs["blank_lines"]:
        print(f"note: {path}: {blank_rows_note(frame)}", file=sys.stderr)
    missing = [c for c in input_columns(spec) if c not in frame.columns]
    if missing:
        raise PredictError(f"{path} lacks column(s) {missing}; the model needs {input_columns(spec)}")
    frame.index.name = f"{path.name} line"  # (read_text_csv's index: the line each record starts on)
    return frame


def predict_rows(model: PyFuncModel, python_model: CFCMLModel, frame: pd.DataFrame, batch_rows: int,
                 out: Path | None = None, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """prob_<class> per row and the predicted class, through the model's own `predict` (which
    confines every path); the whole file is checked before the first image is read, and every
    image (prepare's checks: decodable, right shape, not constant, one voxel grid per row) before
    the first prediction. `out`: the output file, refused when it is one of the images."""
    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from tuning.release.served_model import check_images

    classes = list(python_model.spec.classes)
    typed, files = python_model.check_input(frame)  # every bad row at once, before any model work
    if out is not None and out.exists():  # (--out was checked against --rows already); links count too
        st = out.stat()
        if any((p.stat().st_dev, p.stat().st_ino) == (st.st_dev, st.st_ino)
               for row in files for p in row if p is not None):
            raise PredictError(f"--out {out} is one of the input images; it would be overwritten")
    for warning in check_images(typed, python_model.spec, files):  # prepare's image checks, up front
        print(f"warning: {warning}", file=sys.stderr)
    parts = []
    with tqdm(total=len(typed), desc="predicting", unit="row", disable=None) as bar:
        for start in range(0, len(typed), batch_rows):
            chunk = typed.iloc[start:start + batch_rows]
            parts.append(model.predict(chunk, params=params) if params else model.predict(chunk))
            bar.update(len(chunk))
    probs = pd.concat(parts) if parts else pd.DataFrame(columns=classes, dtype=float)
    table = pd.DataFrame({"patient_id": typed["patient_id"].to_numpy()})
    for c in classes:
        table[f"prob_{c}"] = probs[c].to_numpy()
    table["predicted"] = [classes[i] for i in np.argmax(probs[classes].to_numpy(), axis=1)] if len(table) else []
    for column in ("operating_point", "threshold", "decision"):
        if column in probs.columns:
            table[column] = probs[column].to_numpy()
    return table


def operating_params(python_model: CFCMLModel, raw: bool, operating_point: str | None) -> dict[str, Any]:
    """The model's `predict` parameters for --raw and --operating-point, checked before any row is
    read: an unknown operating point, or one asked of a model registered without them, is refused
    naming the ones it has."""
    calibrator = getattr(python_model, "calibrator", None)
    if operating_point:
        if calibrator is None:
            raise PredictError("--operating-point: this model was registered without operating points")
        try:
            calibrator.point(operating_point)
        except KeyError as exc:
            raise PredictError(f"--operating-point: {exc.args[0]}") from None
    if raw and calibrator is None:
        print("note: this model has no stored temperature: its probabilities are the raw ones", file=sys.stderr)
    params: dict[str, Any] = {}
    if raw:
        params["raw"] = True
    if operating_point:
        params["operating_point"] = operating_point
    return params


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` for the block (unset for None), then as it was: main() may run
    inside another process (tests, a notebook)."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
