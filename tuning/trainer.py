"""Ray Train glue: run `cfcml.training.CrossValidation` on a `TorchTrainer` worker group.

`train_loop_per_worker` is what every DDP worker runs: it rebuilds the folds from the prepared
dataset, resumes from the newest intact checkpoint when there is one (a restarted worker group
after a crash, or a resumed search), and reports every epoch's metrics with a checkpoint (all folds'
models, optimisers, schedulers and prototype banks, plus the out-of-fold predictions of that
epoch; see `tuning.checkpoints`). `fit` launches it; inside a Tune trial its reports are forwarded
to Tune by `TuneReportCallback`.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from cfcml.config import ExperimentConfig

# No torch import at module level: the Tune trial actor and the Train controller unpickle
# `train_loop_per_worker` by reference and so import this module; only the workers need torch.


@dataclass(frozen=True)
class TrainJob:
    """One Ray Train run: `experiment` trained on the folds of the dataset prepared in
    `prepared_dir` for up to `max_epochs` (a CV trial), or, with `final`, on all development rows
    (the final model).

    predict_test: after the last epoch, and only then, predict the held-out test split once (the
    final model; a comparison's fold ensemble, whose K fold models' probabilities are averaged).
    Never set by a search trial: tuning and model selection do not see the test split.
    """

    experiment: ExperimentConfig
    prepared_dir: str
    max_epochs: int
    final: bool = False
    predict_test: bool = False


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
    import ray.train.torch
    import torch

    from cfcml.data.manifest import PreparedDataset
    from cfcml.training import CrossValidation, Split, prediction_frame
    from tuning.checkpoints import restorable, write_checkpoint

    t_start = time.perf_counter()
    _quiet_report_log()
    job: TrainJob = config["job"]
    cfg = job.experiment
    torch.set_num_threads(max(int(cfg.train.cpus_per_worker), 1))
    prepared = PreparedDataset.load(job.prepared_dir)
    if job.final:
        splits = [Split(prepared.dev_frame(), None)]
    else:
        splits = [Split(*prepared.fold_frames(k)) for k in range(prepared.folds)]
    cv = CrossValidation(prepared, splits, cfg, ray.train.torch.get_device())

    restored: dict[str, Any] = {}  # the restored epoch's metrics, re-sent with the first report
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group (or a resumed search) continues where it stopped
        with ckpt.as_directory() as d:
            reader = restorable(d, log=lambda msg: print(f"[cfcml] {msg}", flush=True))
            if reader is not None:
                cv.load_state_dict(reader.state(map_location=cv.device))
                restored = reader.metrics()
    resumed_from = cv.epoch

    t_ready = time.perf_counter()
    rank = ray.train.get_context().get_world_rank()
    compute_s = 0.0  # this process's time in training/validation, to tell start-up overhead apart
    while cv.epoch < job.max_epochs:
        t0 = time.perf_counter()
        metrics, oof = cv.run_epoch()
        compute_s += time.perf_counter() - t0
        metrics.update(time_compute_s=compute_s, time_setup_s=t_ready - t_start, resumed_from_epoch=resumed_from)
        test = None
        if job.predict_test and cv.epoch == job.max_epochs:
            # The one look at the held-out test split, after training has ended: every fold's
            # model (one for a final model) with its own normaliser, probabilities averaged.
            frame = prepared.test_frame()
            probs = sum(cv.predict(f, prepared.dataset(frame, f.normalizer)) for f in cv.folds) / len(cv.folds)
            test = prediction_frame(frame, probs, prepared.spec.classes)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                write_checkpoint(tmp, cv.state_dict(), metrics, oof, test)  # this epoch only
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if restored:
                metrics["restored"], restored = restored, {}
            ray.train.report(metrics, checkpoint=checkpoint)


def fit(job: TrainJob, name: str, storage_path: str, metric: str | None, callbacks: list | None = None) -> Any:
    """Run `train_loop_per_worker` on a TorchTrainer; a rerun with the same name resumes.

    Ray Train keeps the best checkpoint by `metric` and the latest one (two if no metric), so a
    damaged latest checkpoint leaves an older one to restart from. Worker crashes restart the
    worker group from the last checkpoint up to `train.max_failures` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = job.experiment.train
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    keep = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order="max") \
        if metric else CheckpointConfig(num_to_keep=2)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=keep,
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
        ),
    )
    return trainer.fit()
