"""Tune CFCML on one dataset: Ray Tune + Optuna (TPE) + ASHA over lockstep cross-validation folds.

    python tuning/search.py --dataset men --search smoke --data-root data/men

Each trial is one configuration trained on all K folds by a Ray Train `TorchTrainer`; ASHA
stops trials on the mean validation metric over folds. Every trial lands in MLflow as a child
run of the search's parent run. At the end the best configuration is retrained on all
development data, evaluated once on the held-out test split and registered (see
`pipelines/train_final.py`), unless --no-final.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python tuning/search.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cfcml.config import PROJECT_ROOT, ConfigError, ExperimentConfig, deep_merge, load_experiment
from tuning.space import SearchConfig, initial_point, load_search

SEARCH_STATE = "cfcml_search.json"
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic table reporter (our CLIReporter)
# A local Ray started by the search: Ray Train's controller polls its workers every 2 s by default,
# which adds seconds to every trial's start and end; a laptop has no preemptible nodes to watch.
LOCAL_RAY_ENV = {
    "PYTHONPATH": str(PROJECT_ROOT),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


class SearchInterrupted(RuntimeError):
    """The user stopped the search; its state is saved for --resume."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="conf/datasets/NAME.yaml and conf/experiments/NAME.yaml")
    p.add_argument("--search", default="default", help="conf/search/NAME.yaml (or a path)")
    p.add_argument("--data-root", type=Path, help="dataset folder (raw layout, or a prepared folder "
                   "holding manifest.parquet); default data/<dataset>")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (ASHA max_t)")
    p.add_argument("--folds", type=int, help="cross-validation folds")
    p.add_argument("--workers", type=int, help="Ray Train (DDP) workers per trial")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray Train worker")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker")
    p.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start a local Ray")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    p.add_argument("--runs-dir", type=Path, default=PROJECT_ROOT / "runs",
                   help="where Ray results, checkpoints and the default MLflow store live")
    p.add_argument("--name", help="search name (default <dataset>-<search>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of this name")
    p.add_argument("--no-final", action="store_true", help="skip retraining/testing/registering the best configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any experiment key, e.g. --set model.pretrained=/weights/swin_t.pt "
                        "--set train.batch_size=16 (repeatable; validated like the YAML)")
    return p.parse_args(argv)


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs; values are read as YAML (numbers, lists, true/false, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.pretrained=/weights/swin_t.pt")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"train.seed": args.seed, **parse_set(args.set)}
    for flag, key in (("workers", "train.workers"), ("gpus_per_worker", "train.gpus_per_worker"),
                      ("cpus_per_worker", "train.cpus_per_worker"), ("folds", "train.folds")):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    return out


def resolve_prepared(dataset: str, root: Path, cfg: ExperimentConfig) -> Any:
    """Validate and prepare the dataset (cache reused when unchanged); a prepared folder is used as is."""
    from cfcml.data.manifest import PreparedDataset
    from cfcml.data.prepare import prepare_dataset

    if (root / "manifest.parquet").is_file():
        prepared = PreparedDataset.load(root)
        if prepared.folds != cfg.train.folds:
            raise ConfigError(f"train.folds: the search wants {cfg.train.folds} folds but {root} was "
                              f"prepared with {prepared.folds}; prepare it again with --folds {cfg.train.folds}")
        return prepared
    if not root.is_dir():
        raise ConfigError(f"--data-root: no dataset at {root}. Generate one with "
                          f"`python pipelines/make_synthetic.py --dataset {dataset} --out {root}` "
                          f"or point --data-root at your data")
    return prepare_dataset(dataset, root, folds=cfg.train.folds, seed=cfg.train.seed,
                           image_size=cfg.train.image_size, progress=True, log=print)


def trial_concurrency(cfg: ExperimentConfig) -> int:
    """How many trials fit on the cluster at once, from its CPUs and GPUs."""
    import ray

    res = ray.cluster_resources()
    t = cfg.train
    fits = [res.get("CPU", 1) // max(t.workers * t.cpus_per_worker, 1e-9)]
    if t.gpus_per_worker > 0:
        fits.append(res.get("GPU", 0) // (t.workers * t.gpus_per_worker))
    return max(int(min(fits)), 1)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], prepared_dir: str, storage: str,
              max_epochs: int, metric: str) -> None:
    """One Tune trial: the sampled values over the base config, trained on all folds by Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tuning.trainer import fit

    trial_id = tune.get_context().get_trial_id()
    experiment = deep_merge(base, dict(config))
    fit({"experiment": experiment, "prepared_dir": prepared_dir, "max_epochs": max_epochs},
        name=f"trial_{trial_id}", storage_path=storage, metric=metric, callbacks=[TuneReportCallback()])


def main(argv: list[str] | None = None) -> int:
    from cfcml.data.validation import DatasetValidationError

    args = parse_args(argv)
    t_start = time.time()
    try:
        base = load_experiment(args.dataset)
        search = load_search(args.search, base)
        overrides = {**search.overrides, **({"train.folds": search.folds} if search.folds else {}),
                     **cli_overrides(args)}
        cfg = base.replace(overrides)
        max_epochs = args.max_epochs or search.max_epochs or cfg.train.epochs
        num_samples = args.num_samples or search.num_samples
        root = (args.data_root or PROJECT_ROOT / "data" / args.dataset).resolve()
        prepared = resolve_prepared(args.dataset, root, cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatasetValidationError as exc:  # the full report, every problem named
        print(exc, file=sys.stderr)
        return 1
    name = args.name or f"{args.dataset}-{search.name}"
    runs_dir = args.runs_dir.resolve()
    storage = runs_dir / "ray"
    search_dir = storage / name
    if search_dir.exists() and not args.resume:
        print(f"error: a search named {name!r} already exists at {search_dir}; pass --resume to "
              f"continue it, or --name to start a new one", file=sys.stderr)
        return 2
    if args.resume and not search_dir.exists():
        print(f"error: --resume: no search named {name!r} under {storage}", file=sys.stderr)
        return 2

    import ray

    from tuning.report import print_summary
    started_ray = not ray.is_initialized()
    if started_ray:
        # The dashboard serves the state API that Ray Train uses to clean up after stopped trials.
        ray.init(address=args.address, include_dashboard=True, log_to_driver=True,
                 runtime_env=None if args.address else {"env_vars": LOCAL_RAY_ENV})
    try:
        try:
            outcome = run_search(args, cfg, search, prepared, name, storage, runs_dir, max_epochs, num_samples)
        except SearchInterrupted as exc:
            print(f"\n{exc}", file=sys.stderr)
            return 130
        print_summary(outcome, time.time() - t_start)
        if not args.no_final:
            from pipelines.train_final import train_final

            train_final(prepared, outcome, tracking_uri=outcome["tracking_uri"], storage=str(storage))
        else:
            from pipelines.train_final import register_cv_ensemble

            register_cv_ensemble(prepared, outcome, tracking_uri=outcome["tracking_uri"])
    finally:
        if started_ray:
            ray.shutdown()
    print(f"\nMLflow: {outcome['tracking_uri']}  (experiment cfcml-{args.dataset}, parent run {outcome['parent_run_id']})")
    if outcome["tracking_uri"].startswith("sqlite:"):
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        print(f"Open the UI with:  {mlflow_bin if mlflow_bin.exists() else 'mlflow'} ui "
              f"--backend-store-uri {outcome['tracking_uri']}   (then http://127.0.0.1:5000)")
    return 0


def run_search(args: argparse.Namespace, cfg: ExperimentConfig, search: SearchConfig, prepared: Any,
               name: str, storage: Path, runs_dir: Path, max_epochs: int, num_samples: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tuning.tracking import (INTERRUPTED, SearchTracker, default_tracking_uri, experiment_id, git_commit, log_metrics, log_params,
                                 write_json_artifact)

    spec = prepared.spec
    metric = f"cv_{spec.selection_metric}"
    tracking_uri = args.tracking_uri or default_tracking_uri(runs_dir)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, args.dataset, runs_dir / "mlartifacts" if tracking_uri.startswith("sqlite:") else None)
    search_dir = storage / name
    state_file = search_dir / SEARCH_STATE
    if args.resume and state_file.is_file():
        state = json.loads(state_file.read_text())
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(exp_id, run_name=name, tags={
            "cfcml.kind": "search", "cfcml.search": str(search_dir), "cfcml.dataset": args.dataset,
            "cfcml.dataset_fingerprint": prepared.fingerprint, "mlflow.source.git.commit": git_commit(),
        })
        parent_id = parent.info.run_id
        search_dir.mkdir(parents=True, exist_ok=True)
        state = {"parent_run_id": parent_id, "tracking_uri": tracking_uri, "dataset": args.dataset,
                 "metric": metric, "prepared_dir": str(prepared.out_dir)}
        state_file.write_text(json.dumps(state, indent=1))
        log_params(client, parent_id, {
            "search": search.name, "num_samples": num_samples, "max_epochs": max_epochs,
            "folds": cfg.train.folds, "seed": args.seed, "dataset_fingerprint": prepared.fingerprint,
            "git_commit": git_commit(), "workers": cfg.train.workers, "gpus_per_worker": cfg.train.gpus_per_worker,
        })
        write_json_artifact(client, parent_id, {"search": {k: v for k, v in vars(search).items() if k != "space"},
                                                "space": [vars(p) for p in search.space],
                                                "experiment": cfg.to_dict()}, "search_config.json")

    trainable = tune.with_parameters(
        run_trial, base=cfg.to_dict(), prepared_dir=str(prepared.out_dir), storage=str(storage / "train"),
        max_epochs=max_epochs, metric=metric,
    )
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1})  # the TorchTrainer's workers hold the CPUs
    tracker = SearchTracker(tracking_uri, exp_id, parent_id, str(search_dir), metric,
                            list(spec.classes), spec.task)
    if args.resume:
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_errored=True)
    else:
        searcher = OptunaSearch(
            metric=metric, mode="max", seed=args.seed,
            points_to_evaluate=[initial_point(search, cfg)] if search.space else None,
        )
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=min(search.grace_period, max_epochs),
                                  reduction_factor=search.reduction_factor)
        reporter = tune.CLIReporter(
            metric_columns={"epoch": "epoch", metric: metric, "train_loss": "train_loss"},
            parameter_columns=[p.key for p in search.space], max_report_frequency=15,
            sort_by_metric=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space={p.key: p.tune_domain() for p in search.space},
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", search_alg=searcher, scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=trial_concurrency(cfg),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[tracker],
                                      progress_reporter=reporter, verbose=1),
        )
    results = tuner.fit()
    if INTERRUPTED.is_set():  # Ctrl-C: Tune stopped the trials and saved its state
        client.set_terminated(parent_id, "KILLED")
        raise SearchInterrupted(f"search {name!r} interrupted after {len(results)} of {num_samples} trials "
                                f"started; continue it with the same command plus --resume")
    outcome = collect_outcome(results, metric, cfg, search)
    outcome.update(tracking_uri=tracking_uri, parent_run_id=parent_id, experiment_id=exp_id,
                   dataset=args.dataset, search_dir=str(search_dir), prepared_dir=str(prepared.out_dir))
    from pipelines.train_final import OUTCOME_FILE

    (search_dir / OUTCOME_FILE).write_text(json.dumps(outcome, indent=1, default=str))
    best = outcome.get("best")
    if best:
        log_metrics(client, parent_id, {f"best_{k}": v for k, v in best["metrics"].items()})
        client.set_tag(parent_id, "cfcml.best_trial", best["trial_id"])
        write_json_artifact(client, parent_id, best, "best_configuration.json")
    client.set_terminated(parent_id, "FINISHED" if best else "FAILED")
    return outcome


def collect_outcome(results: Any, metric: str, cfg: ExperimentConfig, search: SearchConfig) -> dict[str, Any]:
    """Per trial: its best epoch by the CV metric (validation folds only, never the test split)."""
    import pandas as pd

    trials = []
    for result in results:
        df = result.metrics_dataframe
        if df is None or metric not in df or df[metric].dropna().empty:
            trials.append({"trial_id": (result.metrics or {}).get("trial_id", "?"), "error": str(result.error)})
            continue
        ties = df[df[metric] == df[metric].max()]
        row = ties.iloc[0]  # the earliest best epoch: the final model trains that long
        # Ray Train keeps the best-scoring checkpoint; among tied epochs, take one that survived.
        checkpoint = next((p for p in reversed(ties.get("checkpoint_path", pd.Series(dtype=object)).tolist())
                           if isinstance(p, str) and ("://" in p or Path(p).exists())), None)
        params = {p.key: result.config.get(p.key) for p in search.space}
        trials.append({
            "trial_id": row.get("trial_id", "?"),
            "params": params,
            "score": float(row[metric]),
            "epoch": int(row["epoch"]),
            "epochs_run": int(df["epoch"].max()),
            # time_total_s: Tune's clock for the trial function; minus compute = start-up overhead
            "wall_s": float(df["time_total_s"].iloc[-1]),
            "compute_s": float(df["time_compute_s"].iloc[-1]),
            "checkpoint_path": checkpoint,
            "metrics": {k: float(v) for k, v in row.items()
                        if isinstance(k, str) and k.startswith(("cv_", "val_", "train_"))
                        and isinstance(v, (int, float)) and not isinstance(v, bool)},
            "experiment": deep_merge(cfg.to_dict(), params),
        })
    scored = [t for t in trials if "score" in t]
    best = max(scored, key=lambda t: t["score"]) if scored else None
    return {"metric": metric, "trials": trials, "best": best}


if __name__ == "__main__":
    sys.exit(main())
