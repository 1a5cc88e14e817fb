"""Tune CFCML on one dataset: Ray Tune + Optuna (TPE) + ASHA over lockstep cross-validation folds.

    python tuning/search.py --dataset men --search smoke --data-root data/men

Each trial is one configuration trained on all K folds by a Ray Train `TorchTrainer`; ASHA
stops trials on the mean validation metric over folds. Every trial lands in MLflow as a child
run of the search's parent run. At the end the best configuration is retrained on all
development data, evaluated once on the held-out test split and registered (see
`tuning/release/final.py`), unless --no-final. Settings combine as documented in `tuning/hpo/run.py`:
command line > search file > experiment file > defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from cfcml.config import ConfigError
from cfcml.data.validation import DatasetValidationError
from tuning.cli import args as cli_args
from tuning.hpo.driver import STATE_FILE, SearchState
from tuning.hpo.run import SearchRun, parse_set
from tuning.records.outcome import SearchOutcome


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
    return SearchRun.build(
        args.dataset, args.search, data_root=args.data_root, runs_dir=args.runs_dir, name=args.name,
        num_samples=args.num_samples, max_epochs=args.max_epochs, folds=args.folds, seed=args.seed,
        fold_seed=args.fold_seed, image_size=args.image_size, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        overrides=parse_set(args.set), tracking_uri=args.tracking_uri, address=args.address,
        resume=args.resume, final=not args.no_final, explain_test_patients=args.explain_test_patients,
        verbose=args.verbose,
    )


def check_resume(run: SearchRun, state: SearchState, fingerprint: str) -> None:
    """A resumed search continues the experiment it started, or nothing: ConfigError naming every
    resolved setting that differs from the state file's record (both values), before Ray starts.
    Only `tuning.hpo.run.RESUME_MAY_CHANGE` (and --verbose, --address, --no-final) may differ."""
    source = run.search_dir / STATE_FILE
    if run.tracking_uri is not None and run.tracking_uri != state.tracking_uri:
        raise ConfigError(f"--resume: --tracking-uri {run.tracking_uri} is not this search's store "
                          f"{state.tracking_uri} ({source}); leave --tracking-uri out to resume it")
    if state.settings is None:
        print(f"warning: {source} predates recorded settings; resuming without checking that they are unchanged",
              file=sys.stderr)
        return
    changed = state.changed(run.settings(fingerprint))
    if changed:
        raise ConfigError(f"--resume: search {run.name!r} was started with other settings ({'; '.join(changed)}); "
                          f"resume it with the settings it started with (see {source}), or start a new search "
                          f"with --name")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The search's lock (tuning.runtime.locks), held until this returns or raises (Ctrl-C included).
    with contextlib.ExitStack() as held:
        return _main(args, held)


def _main(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from cfcml.data.spec import load_dataset_spec
    from tuning.hpo.prepared import load_or_prepare
    from tuning.records.state_files import check_resume_state
    from tuning.runtime.locks import search_lock
    from tuning.runtime.preflight import (
        check_free_space,
        check_ray_address,
        check_runs_dir,
        check_storage,
        check_utf8,
        model_parameters,
        search_bytes,
    )

    t_start = time.time()
    try:
        check_utf8(("--runs-dir", args.runs_dir), ("--name", args.name), ("--data-root", args.data_root),
                   ("--tracking-uri", args.tracking_uri))
        run = build_run(args)
        check_runs_dir(run.runs_dir)
        experiment = f"cfcml-{run.dataset}"
        if not run.resume:  # (a resumed search's store is its state file's, checked below)
            check_storage(run.runs_dir, run.tracking_uri, experiment=experiment)
        # One command at a time on this search (a second one of the same name, a --resume of a
        # running one), before its folder is looked at.
        held.enter_context(search_lock(run.storage, run.name))
        if run.search_dir.exists() and not run.resume:
            raise ConfigError(f"a search named {run.name!r} already exists at {run.search_dir}; pass --resume to "
                              f"continue it, or --name to start a new one")
        if run.resume and not run.search_dir.exists():
            raise ConfigError(f"--resume: no search named {run.name!r} under {run.storage}")
        # Where results go, before the data is prepared and Ray starts (a resumed search keeps its store).
        if run.resume:  # state files a full disk or a crash cut short: named, or moved aside
            check_resume_state(run.search_dir, run.storage / "train", STATE_FILE)
        state = SearchState.load(run.search_dir) if run.resume else None
        if state is not None:
            check_storage(run.runs_dir, state.tracking_uri, source=f"{run.search_dir / STATE_FILE}: tracking_uri",
                          experiment=experiment)
        check_ray_address(run.address)
        t = run.experiment.train
        # Room for the checkpoints, before the data is prepared (the dataset file's spec at the
        # search's image size builds the network whose size the estimate needs). A resumed search
        # has its finished trials' checkpoints on disk already: room for one more.
        parameters = model_parameters(run.experiment, load_dataset_spec(run.dataset, t.image_size))
        needed = search_bytes(parameters, t.folds, 1 if run.resume else run.num_samples)
        check_free_space(run.runs_dir, needed)
        prepared = load_or_prepare(run.dataset, run.data_root, folds=t.folds, fold_seed=run.fold_seed,
                                   image_size=t.image_size)
        run.metric(prepared.spec)  # a selection metric the task lacks fails here, before Ray starts
        if state is not None:
            check_resume(run, state, prepared.fingerprint)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatasetValidationError as exc:  # the full report, every problem named
        print(exc, file=sys.stderr)
        return 1

    from tuning.evidence.search_report import write_report
    from tuning.evidence.summary import print_summary
    from tuning.hpo.driver import SearchInterrupted, run_search
    from tuning.release.final import register_cv_ensemble, train_final
    from tuning.runtime.preflight import checkpoint_bytes, tracking_uri_choice
    from tuning.runtime.ray_cluster import SEARCH_FLAGS, ray_session
    from tuning.tracking.lifecycle import DiskGuard, disk_full_message, release_reserves, reserve_space
    from tuning.tracking.store import ui_url

    # Room for MLflow to record the runs' end should the disk fill up (released then), and a
    # guard that stops the search while one more checkpoint still fits.
    reserve_space(run.runs_dir)
    store = tracking_uri_choice(state.tracking_uri if state else run.tracking_uri, run.runs_dir)[0]
    if store.startswith("sqlite:///") and Path(store[len("sqlite:///"):]).parent != run.runs_dir:
        reserve_space(Path(store[len("sqlite:///"):]).parent)
    guard = DiskGuard(run.runs_dir, checkpoint_bytes(parameters, t.folds) + 2**20)
    try:
        # Ray that did not start, or trials that cannot fit on it: one line, before any trial starts
        with ray_session(run.address, verbose=run.verbose, train=t, flags=SEARCH_FLAGS):
            try:
                outcome = run_search(run, prepared, callbacks=[guard])
            except SearchInterrupted as exc:
                print(f"\n{exc}", file=sys.stderr)
                return 130
            print_summary(outcome, time.time() - t_start)
            stop_on_full_disk(outcome)
            if outcome.best is None:  # every trial failed: nothing to retrain, register or report
                from tuning.tracking.callbacks import reason_line

                reasons = sorted({reason_line(t.error) for t in outcome.trials})
                print(f"error: no trial of search {run.name!r} produced a score ({len(outcome.trials)} trial(s) "
                      f"failed: {'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})", file=sys.stderr)
                return 1
            if run.final:
                from cfcml.training import TrainingDiverged

                try:
                    final = train_final(prepared, outcome, storage=run.storage, explain=run.explain_test_patients)
                except TrainingDiverged as exc:  # the best configuration diverged on all development data
                    print(f"error: final model: {exc}", file=sys.stderr)
                    return 1
            else:
                register_cv_ensemble(prepared, outcome)
                final = None
        report = write_report(outcome, prepared, run.search, final)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = disk_full_message(exc, run.runs_dir, needed)
        if message is None:
            raise
        print(f"\nerror: {message}", file=sys.stderr)  # the runs are FAILED with the reason (tuning.tracking.lifecycle)
        return 1
    finally:
        release_reserves()
    print(f"\nreport: {report} (also on the parent run)")
    if final and final.get("evidence") is not None:  # what a clinical reader looks for first
        from tuning.evidence.clinical import calibration_table, operating_table

        print("\nCalibration (the registered model returns the calibrated probabilities):")
        print("\n".join(calibration_table(final["evidence"])))
        print("\nOperating points (predict.py --operating-point CLASS:NAME):")
        print("\n".join(operating_table(final["evidence"])))
        print(f"\nmodel card, figures and tables: model_card.md and clinical/ on the final run {final['run_id']}")
    print(f"\nMLflow: {outcome.tracking_uri}  (experiment cfcml-{run.dataset}, parent run {outcome.parent_run_id})")
    if outcome.tracking_uri.startswith("sqlite:"):
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        print(f"Open the UI with:  {mlflow_bin if mlflow_bin.exists() else 'mlflow'} ui --host 127.0.0.1 "
              f"--backend-store-uri {outcome.tracking_uri}\n   then {ui_url(outcome.experiment_id)}")
    elif outcome.tracking_uri.startswith(("http://", "https://")):
        print(f"Runs: {ui_url(outcome.experiment_id, outcome.tracking_uri.rstrip('/'))}")
    return 0


def stop_on_full_disk(outcome: SearchOutcome) -> None:
    """Trials that failed on a full disk (their checkpoints could not be written) make the search's
    result incomplete: its parent run is FAILED with the reason and an OSError(ENOSPC) raised,
    rather than a final model trained from the trials that happened to fit. --resume reruns them."""
    import errno

    from mlflow.tracking import MlflowClient

    from tuning.tracking.lifecycle import end_run, is_disk_full, release_reserves

    full = next((t.error for t in outcome.trials if t.error and is_disk_full(RuntimeError(t.error))), None)
    if full is None:
        return
    line = next((x.strip() for x in reversed(full.splitlines()) if x.strip()), full)[:300]
    release_reserves()
    end_run(MlflowClient(outcome.tracking_uri), outcome.parent_run_id, "FAILED", f"disk full: a trial failed: {line}",
            only_running=False)
    raise OSError(errno.ENOSPC, f"a trial could not write to the disk: {line}")


if __name__ == "__main__":
    sys.exit(main())
