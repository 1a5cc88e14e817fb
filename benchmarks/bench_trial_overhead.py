"""What a search trial costs besides training: fixed cost, per-epoch checkpoint cost, imports.

Four measurements, each printed with the machine's load average (on a shared machine, compare
figures taken close together):

1. Import cost of the two fresh processes a trial starts, in a fresh interpreter each: the trial
   actor (the trial function's module, the `SearchRun` it is given, Tune's report callback and
   what `tuning.hpo.trainer.fit` imports to build its trainer for one CPU worker) and the Ray Train
   worker (`cfcml.training`); wall and CPU seconds, and whether torch / mlflow / ray were imported.
2. The per-epoch checkpoint cost at the smoke size: `CrossValidation.state_dict()` plus
   `tuning.records.checkpoints.write_checkpoint` (weights, Adam moments, out-of-fold predictions, hashes),
   and the part of it on the training path (since issue 16 only the state's copy,
   `tuning.hpo.trainer._detached`; the write runs on Ray Train's upload thread).
3. The fixed cost per trial: the smoke search run one trial at a time (`--max-concurrent 1` is
   implied by 1 CPU for Ray), at `--epochs` 1 and 3; per trial, overhead = wall (Tune's
   time_total_s) - compute (the worker's training and validation); the least-squares line of
   overhead on epochs run gives the fixed cost (intercept) and the per-epoch non-training cost
   (slope: checkpoint, report, Ray's copy); and how many epochs wrote a checkpoint, which with
   (2) gives checkpointing's average share of an epoch.
4. With `--orchestration`: what the machinery alone costs a trial, with no training at all. Tune
   runs `--samples` trials one at a time of (a) a plain Tune function trainable that reports once,
   (b) a one-worker Ray Train `DataParallelTrainer` inside the trial reporting once (what
   `tuning.hpo.trainer.fit` builds for one CPU worker), (c) the same with `TorchTrainer` (what it built
   before issue 16); wall seconds per trial of `Tuner.fit()`, Tune's own start included.

    python -m benchmarks.bench_trial_overhead [--samples 2] [--epochs 1 3] [--skip-search] [--orchestration]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACTOR_IMPORTS = """
import tuning.hpo.run, ray.tune.integration.ray_train
import tuning.hpo.trainer as t
try:
    import tuning.hpo.trial  # the trial function's module
except ImportError:  # the code before issue 16: run_trial lived in tuning.hpo.driver
    import tuning.hpo.driver
if hasattr(t, "trainer_class"):
    t.trainer_class(1, False)
else:  # the code before issue 16: fit() imported ray.train.torch
    from ray.train.torch import TorchTrainer
"""
WORKER_IMPORTS = "import cfcml.training"
PROBE = """
import resource, sys, time
t0 = time.perf_counter()
exec({code!r})
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print({{"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
       "loaded": [m for m in ("torch", "mlflow", "ray", "monai.handlers", "sklearn") if m in sys.modules]}})
"""


def import_cost(code: str, repeats: int = 2) -> dict:
    """Best of `repeats` fresh interpreters (CPU seconds include the interpreter's own start)."""
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True,
                             env=env, check=True).stdout.strip().splitlines()[-1]
        runs.append(eval(out))  # our own probe's dict literal
    return min(runs, key=lambda r: r["cpu_s"])


def checkpoint_cost(tmp: Path, repeats: int = 3) -> dict:
    """Seconds to snapshot and write one smoke-size checkpoint; and one smoke epoch's compute."""
    from cfcml.config import load_experiment
    from cfcml.data.prepare import prepare_dataset
    from cfcml.data.synthetic import make_men
    from cfcml.training import CrossValidation, cv_splits
    from tuning.hpo.run import resolve_experiment
    from tuning.hpo.space import load_search
    from tuning.records.checkpoints import write_checkpoint

    size = (32, 32, 8)
    root = make_men(tmp / "men_ckpt", patients=60, seed=0, size=size)
    prepared = prepare_dataset("men", root, folds=2, fold_seed=0, image_size=size)
    cfg = resolve_experiment("men", load_search("smoke", load_experiment("men")), {})
    cv = CrossValidation(prepared, cv_splits(prepared), cfg)
    t0 = time.perf_counter()
    metrics, oof = cv.run_epoch()
    epoch_s = time.perf_counter() - t0
    times, size_mb = [], 0.0
    for i in range(repeats):
        t0 = time.perf_counter()
        d = write_checkpoint(tmp / f"ckpt{i}", cv.state_dict(), metrics, oof)
        times.append(time.perf_counter() - t0)
        size_mb = sum(f.stat().st_size for f in d.iterdir()) / 1e6
    try:  # since issue 16 the training path only copies the state; the write is on Ray Train's upload thread
        from tuning.hpo.trainer import _detached
    except ImportError:  # before: the write was on the training path
        path_s = min(times)
    else:
        path_s = min(_timed(lambda: _detached(cv.state_dict())) for _ in range(repeats))
    return {"epoch_s": epoch_s, "checkpoint_s": min(times), "checkpoint_mb": size_mb, "path_s": path_s}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def search_overheads(tmp: Path, samples: int, epochs: int) -> list[dict]:
    from cfcml.data.synthetic import make_men
    from tuning.search import main as search_main

    root = make_men(tmp / f"men{epochs}", patients=60, seed=0, size=(32, 32, 8))
    runs = tmp / f"runs{epochs}"
    rc = search_main(["--dataset", "men", "--search", "smoke", "--data-root", str(root),
                      "--runs-dir", str(runs), "--num-samples", str(samples), "--max-epochs", str(epochs),
                      "--tracking-uri", f"sqlite:///{tmp}/mlflow{epochs}.db", "--no-final",
                      "--cpus-per-worker", str(os.cpu_count())])  # one trial at a time
    if rc != 0:
        sys.exit(rc)
    search_dir = runs / "ray" / "men-smoke"
    outcome = json.loads((search_dir / "outcome.json").read_text(encoding="utf-8"))
    written = {}  # trial id -> epochs that wrote a checkpoint (EpochReport.checkpointed; absent before issue 16)
    for rows in search_dir.glob("*/result.json"):
        for line in rows.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            written[row["trial_id"]] = written.get(row["trial_id"], 0) + int(row.get("checkpointed", True))
    return [{"epochs": t["epochs_run"], "wall": t["wall_s"], "compute": t["compute_s"],
             "written": written.get(t["trial_id"], t["epochs_run"])}
            for t in outcome["trials"] if "wall_s" in t]


def _report_once(config: dict) -> None:
    """A Ray Train loop or a Tune function trainable that only reports."""
    if config.get("train"):
        import ray.train

        ray.train.report({"epoch": 1})
    else:
        from ray import tune

        tune.report({"epoch": 1})


def _train_in_trial(config: dict) -> None:
    """A Tune trial that runs `_report_once` on one CPU worker of a Ray Train trainer."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    if config["trainer"] == "TorchTrainer":
        from ray.train.torch import TorchTrainer as trainer
    else:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer as trainer
    trainer(_report_once, train_loop_config={"train": True},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count()}),
            run_config=RunConfig(name=f"noop_{tune.get_context().get_trial_id()}", storage_path=config["storage"],
                                 callbacks=[TuneReportCallback()])).fit()


def orchestration_cost(tmp: Path, samples: int) -> dict[str, float]:
    """Wall seconds per trial of Tune alone, and of Tune driving a one-worker Ray Train run."""
    import ray
    from ray import tune

    from tuning.runtime.ray_cluster import local_init_kwargs, scoped_env

    out = {}
    ray.init(address="local", **local_init_kwargs(num_cpus=os.cpu_count()))
    try:
        kinds = {"Tune function trainable": (_report_once, {"cpu": os.cpu_count()}),
                 "Ray Train DataParallelTrainer": (_train_in_trial, {"cpu": 0, "memory": 1}),
                 "Ray Train TorchTrainer": (_train_in_trial, {"cpu": 0, "memory": 1})}
        for name, (fn, resources) in kinds.items():
            space = {"i": tune.grid_search(list(range(samples))), "storage": str(tmp / "noop"),
                     "trainer": name.rsplit(" ", 1)[-1]}
            tuner = tune.Tuner(tune.with_resources(fn, resources), param_space=space,
                               tune_config=tune.TuneConfig(max_concurrent_trials=1),
                               run_config=tune.RunConfig(name=name.replace(" ", "_"), storage_path=str(tmp / "tune"),
                                                         verbose=0))
            t0 = time.perf_counter()
            with scoped_env(RAY_AIR_NEW_OUTPUT="0"):
                results = tuner.fit()
            out[name] = (time.perf_counter() - t0) / samples
            assert not results.errors, results.errors
    finally:
        ray.shutdown()
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope (slope 0 if all xs are equal)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    p.add_argument("--skip-search", action="store_true", help="imports and checkpoint cost only")
    p.add_argument("--orchestration", action="store_true",
                   help="also time trials that only report: Tune alone, and Tune driving Ray Train")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
    actor, worker = import_cost(ACTOR_IMPORTS), import_cost(WORKER_IMPORTS)
    for name, r in (("trial actor", actor), ("worker", worker)):
        print(f"import, {name:11s}: wall {r['wall_s']:5.2f} s, process CPU {r['cpu_s']:5.2f} s, loaded {r['loaded']}")
    with tempfile.TemporaryDirectory() as tmp:
        ck = checkpoint_cost(Path(tmp))
        print(f"checkpoint per write: {ck['checkpoint_s']:.3f} s for {ck['checkpoint_mb']:.1f} MB, of which on the "
              f"training path {ck['path_s']:.3f} s; one smoke epoch's compute {ck['epoch_s']:.2f} s "
              f"(on the training path: {100 * ck['path_s'] / ck['epoch_s']:.0f}%)")
        if args.orchestration:
            for name, seconds in orchestration_cost(Path(tmp), args.samples).items():
                print(f"orchestration, {name:30s}: {seconds:5.1f} s per trial (wall, nothing trained)")
        if args.skip_search:
            return
        trials = []
        for e in args.epochs:
            trials += search_overheads(Path(tmp), args.samples, e)
    print(f"{'epochs':>6s} {'wall s':>8s} {'compute s':>10s} {'overhead s':>11s} {'checkpoints':>12s}")
    for t in trials:
        print(f"{t['epochs']:6d} {t['wall']:8.1f} {t['compute']:10.1f} {t['wall'] - t['compute']:11.1f} "
              f"{t['written']:12d}")
    epochs, written = sum(t["epochs"] for t in trials), sum(t["written"] for t in trials)
    print(f"checkpoints written in {written} of {epochs} epochs: checkpointing costs the training path "
          f"{100 * ck['path_s'] * written / epochs / ck['epoch_s']:.0f}% of a smoke epoch's compute on average")
    fixed, per_epoch = fit_line([t["epochs"] for t in trials], [t["wall"] - t["compute"] for t in trials])
    print(f"fixed cost per trial {fixed:.1f} s; non-training cost per epoch {per_epoch:.2f} s; "
          f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
