"""Command-line flags shared by the entry points, so that one thing has one spelling everywhere.

    --dataset NAME        conf/datasets/NAME.yaml (+ conf/experiments/NAME.yaml for training)
    --data-root DIR       the dataset folder (raw layout, or prepared: holding manifest.parquet)
    --image-size N ...    the preprocessed image size (H W [D])
    --folds K             cross-validation folds
    --fold-seed N         the seed the folds are drawn with (recorded in the manifest)
    --outer-folds K       nested cross-validation: K outer folds, each a whole search (search.py)
    --seed N              the training seed (weights, batches, augmentation, Optuna)
    --bought-seeds N      what tuning bought: defaults vs the chosen configuration on N fresh seeds (search.py)
    --search NAME         conf/search/NAME.yaml;  --name NAME: the search's name
    --runs-dir DIR        Ray results, checkpoints and the default MLflow store
    --tracking-uri URI    MLflow (default $MLFLOW_TRACKING_URI or a SQLite store in --runs-dir)
    --address ADDR        a Ray cluster ("auto" inside one); default: $RAY_ADDRESS, else a local Ray
    --verbose             Ray's own log lines on the console
    --out PATH            where the command writes what it makes

Older spellings stay as aliases: --root (--data-root; make_synthetic: --out), --size (--image-size).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cfcml.config import PROJECT_ROOT


def add_data_root(p: argparse.ArgumentParser, required: bool = False, help: str | None = None,
                  alias: str = "--root") -> None:
    p.add_argument("--data-root", alias, dest="data_root", type=Path, required=required,
                   help=help or "dataset folder (raw layout, or a prepared folder holding manifest.parquet)")


def add_image_size(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--image-size", "--size", dest="image_size", type=int, nargs="+", metavar="N",
                   help=help or "preprocessed image size, e.g. 32 32 8 (MEN) or 64 64 (Derm7pt)")


def add_folds(p: argparse.ArgumentParser, fold_default: int | None = None) -> None:
    p.add_argument("--folds", type=int, default=fold_default, help="cross-validation folds")
    p.add_argument("--fold-seed", type=int, help="seed of the folds (default: the prepared dataset's, or 0)")


def add_outer_folds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outer-folds", dest="outer_folds", type=int, metavar="K",
                   help="nested cross-validation: split the development patients into K (>= 2) outer folds and run "
                        "the whole search once per outer fold on its outer-training patients, scoring each winner "
                        "once on its outer-held-out patients (docs/evaluation.md); off by default")


def add_bought_seeds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bought-seeds", dest="bought_seeds", type=int, metavar="N",
                   help="what tuning bought: after the final model, train the published defaults and the chosen "
                        "configuration on N fresh seeds and report their paired test differences with CIs "
                        "(docs/evaluation.md); 0 = off; default: the search file's bought_seeds")


def add_search_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", default="default", help="conf/search/NAME.yaml (or a path)")
    p.add_argument("--name", help="the search's name (default <dataset>-<search>)")


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", type=Path, default=PROJECT_ROOT / "runs",
                   help="where Ray results, checkpoints and the default MLflow store live")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or <runs-dir>/mlflow.db)")
    p.add_argument("--address", help="Ray cluster address ('auto' inside a cluster, 'local' for a new local Ray); "
                                     "default: $RAY_ADDRESS if set (as ray.init does), else start a local Ray. "
                                     "A host:port that does not answer within 5 s is an error")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines (per-epoch checkpoint "
                   "messages, worker output)")


def add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--explain-test-patients", action="store_true",
                   help="log Grad-CAM and field-occlusion figures of up to two test patients per class on the "
                        "final run. Off by default: the figures show those patients' images and clinical fields "
                        "to anyone who can read the MLflow store; turn it on for synthetic or de-identified data")
