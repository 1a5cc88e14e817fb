"""Ray Train glue: run `cfcml.training.CrossValidation` on a `TorchTrainer` worker group.

`train_loop_per_worker` is what every DDP worker runs: it rebuilds the folds from the prepared
dataset, resumes from the newest intact checkpoint when there is one (a restarted worker group
after a crash, or a resumed search), and reports every epoch's metrics with a checkpoint (all folds'
models, optimisers, schedulers and prototype banks, plus the out-of-fold predictions of that
epoch; see `tuning.checkpoints`), plus what the worker's machine did in that epoch
(`SystemMetrics`). A damaged checkpoint is skipped for the newest intact older one and named in the
first report (`checkpoints_skipped`). `fit` launches it; inside a Tune trial its reports are
forwarded to Tune by `TuneReportCallback`.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
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


class SystemMetrics:
    """What the machine of a Ray Train worker did during each epoch, for MLflow's System Metrics tab.

    A daemon thread samples every `interval` seconds; `epoch()` returns the means since its last
    call under the names MLflow's own `SystemMetricsMonitor` logs (so the UI groups them the same),
    plus the worker process's own memory:

        system/cpu_utilization_percentage         the node's CPUs, averaged over the epoch
        system/system_memory_usage_megabytes      the node's used memory
        system/system_memory_usage_percentage
        system/process_memory_rss_megabytes       this worker process and its children (data loaders)
        system/gpu_0_utilization_percentage       the worker's GPU (NVML, when pynvml is installed)
        system/gpu_0_memory_usage_megabytes       used on the worker's GPU (NVML), else this process's
        system/gpu_0_memory_usage_percentage        reserved CUDA memory (torch)
        system/gpu_0_peak_allocated_megabytes     torch's peak allocation in the epoch (GPU workers)

    The trial's metrics travel with it to the driver, which logs them (trials need no access to the
    tracking server). Measured on rank 0's worker; "gpu_0" is that worker's own CUDA device.
    """

    def __init__(self, device: Any = None, interval: float = 1.0):
        import importlib

        import ray  # noqa: F401  (psutil comes with Ray: ray/thirdparty_files, on sys.path once ray is imported)

        psutil = importlib.import_module("psutil")
        self._psutil = psutil
        self._process = psutil.Process()
        self._samples: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cuda = None
        self._nvml = None
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            self._cuda = torch.device(device)
            self._cuda_total = torch.cuda.get_device_properties(self._cuda).total_memory
            torch.cuda.reset_peak_memory_stats(self._cuda)
            self._nvml = self._nvml_handle()
        psutil.cpu_percent(None)  # starts the first interval
        self._thread = threading.Thread(target=self._run, args=(interval,), name="cfcml-system-metrics", daemon=True)
        self._thread.start()

    def _nvml_handle(self) -> Any:
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(self._cuda).uuid)
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:  # no pynvml, or NVML unusable here: torch's memory figures only
            return None

    def _sample(self) -> dict[str, float]:
        vm = self._psutil.virtual_memory()
        rss = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except self._psutil.Error:
                pass
        out = {"system_memory_usage_megabytes": vm.used / 1e6,
               "system_memory_usage_percentage": vm.used / vm.total * 100,
               "process_memory_rss_megabytes": rss / 1e6}
        if self._nvml is not None:
            pynvml, handle = self._nvml
            try:
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                out["gpu_0_memory_usage_megabytes"] = mem.used / 1e6
                out["gpu_0_memory_usage_percentage"] = mem.used / mem.total * 100
                out["gpu_0_utilization_percentage"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                pass
        elif self._cuda is not None:
            import torch

            reserved = torch.cuda.memory_reserved(self._cuda)
            out["gpu_0_memory_usage_megabytes"] = reserved / 1e6
            out["gpu_0_memory_usage_percentage"] = reserved / self._cuda_total * 100
        return out

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                sample = self._sample()
            except Exception:  # never let measuring break training
                continue
            with self._lock:
                for key, value in sample.items():
                    self._samples[key].append(value)

    def epoch(self) -> dict[str, float]:
        """Means of this epoch's samples (one taken now if the epoch was shorter than the interval)."""
        with self._lock:
            samples, self._samples = self._samples, defaultdict(list)
        if not samples:
            samples = defaultdict(list, {k: [v] for k, v in self._sample().items()})
        out = {f"system/{k}": round(sum(v) / len(v), 2) for k, v in samples.items()}
        out["system/cpu_utilization_percentage"] = float(self._psutil.cpu_percent(None))
        if self._cuda is not None:
            import torch

            out["system/gpu_0_peak_allocated_megabytes"] = round(torch.cuda.max_memory_allocated(self._cuda) / 1e6, 2)
            torch.cuda.reset_peak_memory_stats(self._cuda)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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
    from cfcml.metrics import selection_key
    from cfcml.training import CrossValidation, TrainingDiverged, cv_splits, prediction_frame
    from tuning.checkpoints import restorable, write_checkpoint
    from tuning.outcome import EpochSelection

    t_start = time.perf_counter()
    _quiet_report_log()
    job: TrainJob = config["job"]
    cfg = job.experiment
    torch.set_num_threads(max(int(cfg.train.cpus_per_worker), 1))
    prepared = PreparedDataset.load(job.prepared_dir)
    cv = CrossValidation(prepared, cv_splits(prepared, job.final), cfg, ray.train.torch.get_device())
    # The running selected score (max over this run's epochs so far), reported with every epoch of
    # a CV run: what ASHA, Optuna and the best-trial choice act on (tuning.outcome.EpochSelection).
    spec = prepared.spec
    selection = None if job.final else EpochSelection(
        selection_key(spec.task, len(spec.classes), spec.selection_metric, cfg.train.selection_metric))

    restored: dict[str, Any] = {}  # the restored epoch's metrics, re-sent with the first report
    skipped: list[str] = []  # damaged checkpoints passed over, reported with the first epoch
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("run_dir"):
        # Ray Train's snapshot was damaged and moved aside (tuning.state_files): its checkpoint
        # folders are still there; continue from the newest intact one.
        # checkpoint folders only: the damaged snapshot moved aside is named checkpoint_manager_...
        found = sorted(p for p in Path(config["run_dir"]).glob("checkpoint_*")
                       if p.is_dir() and not p.name.startswith("checkpoint_manager"))
        ckpt = ray.train.Checkpoint.from_directory(str(found[-1])) if found else None
    if ckpt is not None:  # a restarted worker group (or a resumed search) continues where it stopped
        with ckpt.as_directory() as d:
            reader = restorable(d, log=skipped.append)
            if reader is not None:
                cv.load_state_dict(reader.state(map_location=cv.device))
                restored = reader.metrics()
                if selection is not None:  # epochs after the checkpoint are retrained and re-selected
                    selection.restore(restored)
        for message in skipped:
            print(f"[cfcml] {message}", flush=True)
    resumed_from = cv.epoch

    t_ready = time.perf_counter()
    rank = ray.train.get_context().get_world_rank()
    compute_s = 0.0  # this process's time in training/validation, to tell start-up overhead apart
    if restored and cv.epoch >= job.max_epochs:
        # The run had finished, but its last report may never have reached the driver (killed in
        # between): send that epoch's metrics once more; the tracker logs an epoch only once.
        ray.train.report({**restored, "restored": restored, "resumed_from_epoch": resumed_from})
        return
    system = SystemMetrics(cv.device) if rank == 0 else None  # only rank 0's report reaches Tune
    try:
        while cv.epoch < job.max_epochs:
            t0 = time.perf_counter()
            try:
                metrics, oof = cv.run_epoch()
            except TrainingDiverged as exc:
                # Not raised: Ray Train would restart the worker group train.max_failures times from
                # the last checkpoint, and it would diverge again. `fit` raises it on the caller's side.
                print(f"[cfcml] {exc}", flush=True)
                if rank == 0 and config.get("failure_file"):
                    _write_failure(config["failure_file"], exc)
                return
            compute_s += time.perf_counter() - t0
            if selection is not None:
                metrics.update(selection.update(metrics))
            metrics.update(time_compute_s=compute_s, time_setup_s=t_ready - t_start, resumed_from_epoch=resumed_from)
            if system is not None:
                metrics.update(system.epoch())
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
                if skipped:  # named on the driver's console and on the trial's MLflow run
                    metrics["checkpoints_skipped"], skipped = skipped, []
                ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        if system is not None:
            system.close()


FAILURE_FILE = "cfcml_diverged.json"  # in the Ray Train run's folder: why the workers stopped


def _write_failure(path: str, exc: Any) -> None:
    import json
    import os

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps({"fold": exc.fold, "epoch": exc.epoch, "what": exc.what}))
    os.replace(tmp, path)


def fit(job: TrainJob, name: str, storage_path: str, metric: str | None, callbacks: list | None = None,
        label: str | None = None) -> Any:
    """Run `train_loop_per_worker` on a TorchTrainer; a rerun with the same name resumes.

    Ray Train keeps the best checkpoint by `metric` and the latest one (two if no metric), so a
    damaged latest checkpoint leaves an older one to restart from. Worker crashes restart the
    worker group from the last checkpoint up to `train.max_failures` times; a diverged run
    (`cfcml.training.TrainingDiverged`) is not retried: the workers stop at once and `fit` raises
    TrainingDiverged naming `label` (default `name`), the fold and the epoch.
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
    failure = Path(storage_path) / name / FAILURE_FILE
    failure.unlink(missing_ok=True)  # a rerun (a resumed search) starts without the last run's verdict
    trainer = TorchTrainer(
        train_loop_per_worker,
        # run_dir: where this run's checkpoint folders are, should Ray Train's snapshot be lost
        train_loop_config={"job": job, "failure_file": str(failure),
                           "run_dir": None if "://" in storage_path else str(Path(storage_path) / name)},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=keep,
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
        ),
    )
    result = trainer.fit()
    if failure.is_file():
        import json

        from cfcml.training import TrainingDiverged

        data = json.loads(failure.read_text())
        raise TrainingDiverged(data["fold"], data["epoch"], data["what"], trial=label or name)
    return result
