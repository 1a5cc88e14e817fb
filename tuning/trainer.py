"""Ray Train glue: run `cfcml.training.CrossValidation` on a `TorchTrainer` worker group.

`train_loop_per_worker` is what every DDP worker runs: it rebuilds the folds from the prepared
dataset, resumes from the latest checkpoint when there is one, and reports every epoch's metrics
with a checkpoint (all folds' models, optimisers, schedulers and prototype banks, plus the
out-of-fold predictions of that epoch). `fit` launches it; inside a Tune trial its reports are
forwarded to Tune by `TuneReportCallback`.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

# No torch import at module level: the Tune trial actor and the Train controller unpickle
# `train_loop_per_worker` by reference and so import this module; only the workers need torch.

CHECKPOINT_FILE = "state.pt"
OOF_FILE = "oof_predictions.csv"
METRICS_FILE = "metrics.json"
TEST_FILE = "test_predictions.csv"


def _quiet_report_log() -> None:
    """Ray Train logs every report with all its metrics (dozens per epoch here); the driver's
    progress table and MLflow show them already. Its logger is named after its file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import ray.train.torch

    from cfcml.config import from_dict, ExperimentConfig
    from cfcml.data.manifest import PreparedDataset
    from cfcml.training import CrossValidation, Split, prediction_frame

    t_start = time.perf_counter()
    _quiet_report_log()
    cfg = from_dict(ExperimentConfig, config["experiment"], "experiment")
    torch.set_num_threads(max(int(cfg.train.cpus_per_worker), 1))
    prepared = PreparedDataset.load(config["prepared_dir"])
    if config.get("final"):
        splits = [Split(prepared.dev_frame(), None)]
    else:
        splits = [Split(*prepared.fold_frames(k)) for k in range(prepared.folds)]
    cv = CrossValidation(prepared, splits, cfg, ray.train.torch.get_device())

    ckpt = ray.train.get_checkpoint()
    restored: dict[str, Any] = {}  # the restored epoch's metrics, re-sent with the first report
    if ckpt is not None:  # a restarted trial (or a resumed search) continues where it stopped
        with ckpt.as_directory() as d:
            cv.load_state_dict(torch.load(Path(d) / CHECKPOINT_FILE, map_location=cv.device, weights_only=False))
            if (Path(d) / METRICS_FILE).is_file():
                restored = json.loads((Path(d) / METRICS_FILE).read_text())
    resumed_from = cv.epoch

    t_ready = time.perf_counter()
    rank = ray.train.get_context().get_world_rank()
    max_epochs = int(config["max_epochs"])
    compute_s = 0.0  # this process's time in training/validation, to tell start-up overhead apart
    while cv.epoch < max_epochs:
        t0 = time.perf_counter()
        metrics, oof = cv.run_epoch()
        compute_s += time.perf_counter() - t0
        metrics["time_compute_s"] = compute_s
        metrics["time_setup_s"] = t_ready - t_start
        metrics["resumed_from_epoch"] = resumed_from
        test = None
        if config.get("final") and cv.epoch == max_epochs:
            # The one look at the held-out test split, after training has ended.
            fold = cv.folds[0]
            frame = prepared.test_frame()
            probs = cv.predict(fold, prepared.dataset(frame, fold.normalizer))
            test = prediction_frame(frame, probs, prepared.spec.classes)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(cv.state_dict(), Path(tmp) / CHECKPOINT_FILE)
                if len(oof):
                    oof.to_csv(Path(tmp) / OOF_FILE, index=False)
                if test is not None:
                    test.to_csv(Path(tmp) / TEST_FILE, index=False)
                (Path(tmp) / METRICS_FILE).write_text(json.dumps(metrics, indent=1))  # this epoch only
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if restored:
                metrics["restored"], restored = restored, {}
            ray.train.report(metrics, checkpoint=checkpoint)


def fit(
    config: dict[str, Any],
    name: str,
    storage_path: str,
    metric: str | None,
    callbacks: list | None = None,
) -> Any:
    """Run `train_loop_per_worker` on a TorchTrainer; a rerun with the same name resumes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cfcml.config import from_dict, ExperimentConfig

    t = from_dict(ExperimentConfig, config["experiment"], "experiment").train
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    keep = CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order="max") \
        if metric else CheckpointConfig(num_to_keep=1)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=keep,
            failure_config=FailureConfig(max_failures=0),
            callbacks=callbacks or [],
        ),
    )
    return trainer.fit()
