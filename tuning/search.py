"""Tune CFCML on one dataset: Ray Tune + Optuna (TPE) + ASHA over lockstep cross-validation folds.

    python tuning/search.py --dataset men --search smoke --data-root data/men

Each trial is one configuration trained on all K folds by a Ray Train `TorchTrainer`; ASHA
stops trials on the mean validation metric over folds. Every trial lands in MLflow as a child
run of the search's parent run. At the end the best configuration is retrained on all
development data, evaluated once on the held-out test split and registered (see
`tuning/release/final.py`), unless --no-final. Settings combine as documented in `tuning/hpo/run.py`:
command line > search file > experiment file > defaults.

This file parses the arguments, calls `tuning.workflows.search.search_and_register` inside the
error shell (`tuning.cli.shell`: exit 2 for a setting to fix, 1 for a failed search, 130 for Ctrl-C)
and prints where the results are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tuning.cli import args as cli_args
from tuning.cli.shell import run_command
from tuning.hpo.run import SearchRun, parse_set

if TYPE_CHECKING:
    from tuning.workflows.search import SearchResult


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="conf/datasets/NAME.yaml and conf/experiments/NAME.yaml")
    cli_args.add_search_name(p)
    cli_args.add_data_root(p, help="dataset folder (raw layout, or a prepared folder holding manifest.parquet); "
                                   "default data/<dataset>")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the search file's)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial, ASHA's max_t (sets train.epochs)")
    cli_args.add_folds(p)
    cli_args.add_outer_folds(p)
    cli_args.add_bought_seeds(p)
    p.add_argument("--seed", type=int, help="training and Optuna seed (sets train.seed)")
    cli_args.add_image_size(p, help="preprocessed image size (sets train.image_size)")
    p.add_argument("--workers", type=int, help="Ray Train (DDP) workers per trial (train.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray Train worker (train.gpus_per_worker)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker (train.cpus_per_worker)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any experiment key, e.g. --set model.pretrained=/weights/swin_t.pt "
                        "--set train.max_failures=2 (repeatable; validated like the YAML; worker "
                        "crashes are retried train.max_failures times, default 2)")
    cli_args.add_runtime(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of this name")
    p.add_argument("--no-final", action="store_true", help="skip retraining/testing/registering the best configuration")
    cli_args.add_explain(p)
    return p.parse_args(argv)


def build_run(args: argparse.Namespace) -> SearchRun:
    """The resolved search the arguments describe (ConfigError naming a bad flag or setting)."""
    from tuning.runtime.preflight import check_utf8

    check_utf8(("--runs-dir", args.runs_dir), ("--name", args.name), ("--data-root", args.data_root),
               ("--tracking-uri", args.tracking_uri))
    return SearchRun.build(
        args.dataset, args.search, data_root=args.data_root, runs_dir=args.runs_dir, name=args.name,
        num_samples=args.num_samples, max_epochs=args.max_epochs, folds=args.folds, seed=args.seed,
        fold_seed=args.fold_seed, image_size=args.image_size, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        overrides=parse_set(args.set), tracking_uri=args.tracking_uri, address=args.address,
        resume=args.resume, final=not args.no_final, explain_test_patients=args.explain_test_patients,
        verbose=args.verbose, outer_folds=args.outer_folds, bought_seeds=args.bought_seeds,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def search() -> None:
        from tuning.workflows.search import search_and_register

        print_result(search_and_register(build_run(args)))

    return run_command(search, name="search")


def print_result(result: SearchResult) -> None:
    """Where the report, the registered model's clinical tables and the MLflow runs are."""
    from tuning.tracking.store import ui_url

    outcome, release = result.outcome, result.release
    print(f"\nreport: {result.report} (also on the parent run)")
    if release is not None and release.evidence is not None:  # what a clinical reader looks for first
        from tuning.evidence.clinical import calibration_table, operating_table

        print("\nCalibration (the registered model returns the calibrated probabilities):")
        print("\n".join(calibration_table(release.evidence)))
        print("\nOperating points (predict.py --operating-point CLASS:NAME):")
        print("\n".join(operating_table(release.evidence)))
        print(f"\nmodel card, figures and tables: model_card.md and clinical/ on the final run {release.run_id}")
    print(f"\nMLflow: {outcome.tracking_uri}  (experiment cfcml-{result.run.dataset}, parent run "
          f"{outcome.parent_run_id})")
    if outcome.tracking_uri.startswith("sqlite:"):
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        print(f"Open the UI with:  {mlflow_bin if mlflow_bin.exists() else 'mlflow'} ui --host 127.0.0.1 "
              f"--backend-store-uri {outcome.tracking_uri}\n   then {ui_url(outcome.experiment_id)}")
    elif outcome.tracking_uri.startswith(("http://", "https://")):
        print(f"Runs: {ui_url(outcome.experiment_id, outcome.tracking_uri.rstrip('/'))}")


if __name__ == "__main__":
    sys.exit(main())
