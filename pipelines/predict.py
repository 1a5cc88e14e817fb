"""Class probabilities for a CSV of manifest rows, with a registered, logged or saved CFCML model.

    python pipelines/predict.py --model models:/cfcml-men/latest --rows rows.csv --out preds.csv
    python pipelines/predict.py --model runs:/<run id>/model --rows rows.csv --out preds.csv
    python pipelines/predict.py --model path/to/model --rows rows.csv --out preds.csv --data-root /data/men

`--rows` holds the model's input columns: patient_id, path_<modality> (relative to the data root)
and the clinical fields (blank or one of the dataset's missing tokens = missing). `--out` gets
patient_id, prob_<class> for every class (calibrated by the temperature stored in the model;
`--raw` for the network's own) and the predicted class (the argmax); `--operating-point NAME` adds
that operating point's threshold and decision (docs/evaluation.md). A blank optional field is the
missing token; a blank image path is accepted only by a model trained with modality dropout.
Image paths resolve under the
data root recorded when the model was registered (or `--data-root` / $CFCML_DATA_ROOT); a path
that leaves it is refused: the model itself enforces this, whoever calls it.

A model runs no code of its own here: its folder must carry this platform's served-model code
(tuning/release/served_model_code.py, byte for byte) and nothing else to import, and it loads with pickle
deserialisation off; any other model is refused before anything of it is loaded, unless
`--trust-model-code` (then MLflow loads it as it is, running its code).

This file parses the arguments and calls `tuning.workflows.predict.predict_file` inside the error
shell (`tuning.cli.shell`: every problem the user can fix is one `error:` line, exit status 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cfcml.config import PROJECT_ROOT
from tuning.cli import args as cli_args
from tuning.cli.shell import run_command
from tuning.workflows.predict import PredictError, predict_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="models:/<name>/<version|alias|latest>, runs:/<run id>/model, or a local model folder")
    p.add_argument("--rows", required=True, type=Path, help="CSV of manifest rows (the model's input columns)")
    p.add_argument("--out", required=True, type=Path, help="CSV to write: patient_id, prob_<class>..., predicted")
    cli_args.add_data_root(p, help="folder the image paths are relative to (default: the data root recorded at "
                                   "registration; the same as setting $CFCML_DATA_ROOT)")
    p.add_argument("--runs-dir", type=Path, default=PROJECT_ROOT / "runs",
                   help="where the default MLflow store lives (<runs-dir>/mlflow.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ (default: "
                                          "$MLFLOW_TRACKING_URI or <runs-dir>/mlflow.db)")
    p.add_argument("--batch-rows", type=int, default=32, help="rows per model call (the progress bar's step)")
    p.add_argument("--raw", action="store_true", help="the network's own probabilities, not the calibrated ones")
    p.add_argument("--trust-model-code", action="store_true",
                   help="load a model whose code is not this platform's own served-model code (or that holds a "
                        "pickle), running that code in this process; without it such a model is refused before "
                        "anything of it is loaded")
    p.add_argument("--operating-point", metavar="NAME",
                   help="add the decision at this operating point, '<class>:<name>' (e.g. 'MEL:youden', "
                        "'Grade_1:sensitivity_0.90'; the name alone for a binary task); the model card lists them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def predict() -> None:
        out = predict_file(args.model, args.rows, args.out, data_root=args.data_root, runs_dir=args.runs_dir,
                           tracking_uri=args.tracking_uri, batch_rows=args.batch_rows, raw=args.raw,
                           operating_point=args.operating_point, trust_model_code=args.trust_model_code)
        print(f"wrote {len(out)} predictions to {args.out}")

    return run_command(predict, name="predict", usage=(PredictError,))


if __name__ == "__main__":
    sys.exit(main())
