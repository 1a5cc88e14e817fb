"""Ray Train glue: run `cfcml.training.CrossValidation` on a Ray Train worker group.

`train_loop_per_worker` is what every worker runs: it rebuilds the folds from the prepared
dataset, resumes from the newest intact checkpoint when there is one (`Resumption`: a restarted
worker group after a crash, or a resumed search), and reports every epoch as an `EpochReport`
(`report_epoch`), with a checkpoint when `CheckpointPolicy` says so: every
`train.checkpoint_every` epochs, each newly selected epoch and the last (all folds' models,
optimisers, schedulers and prototype banks, plus the out-of-fold predictions of that epoch; see
`tuning.records.checkpoints`), written off the training path on local storage. Rank 0 also reports what
its machine did in that epoch (`SystemMetrics`). A damaged checkpoint is skipped for the newest
intact older one and named in the first report (`checkpoints_skipped`). `fit` launches it on
`trainer_class`'s trainer; inside a Tune trial its reports are forwarded to Tune by
`TuneReportCallback`.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cfcml.config import ExperimentConfig
from cfcml.evaluation import metric_keys

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from ray.train import Checkpoint

    from cfcml.training import CrossValidation, TrainingDiverged
    from tuning.records.outcome import EpochReport, EpochSelection

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
    also: a multi-objective search's other objectives ("cv_<name>"): each epoch also reports their
        values at the selected epoch (`EpochSelection.also`), what Optuna receives with the primary.
    """

    experiment: ExperimentConfig
    prepared_dir: str
    max_epochs: int
    final: bool = False
    predict_test: bool = False
    also: tuple[str, ...] = ()


LOOP_CONFIG = "loop"  # the one key of Ray Train's `train_loop_config`: a `LoopConfig`


@dataclass(frozen=True)
class LoopConfig:
    """Everything `train_loop_per_worker` is given, built by `fit`; Ray Train pickles it to every
    worker as `train_loop_config[LOOP_CONFIG]` (Ray Train wants a dict there: its run-state record
    validates one, so the dataclass rides under one key).

    Args:
        job: what to train, on which prepared dataset, for how many epochs (`TrainJob`).
        failure_file: where rank 0 writes why the workers stopped when training diverged (the run's
            `FAILURE_FILE`; `fit` reads it and raises); None: not written.
        run_dir: the run's folder on local storage, whose newest checkpoint folder a restart uses
            when Ray Train's own snapshot was lost (`Resumption.load`); None on remote storage (a URI).
            Also whether checkpoints are written straight into the run's folder (`report_epoch`'s `local`).
    """

    job: TrainJob
    failure_file: str | None = None
    run_dir: str | None = None


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

    def __init__(self, device: torch.device | None = None, interval: float = 1.0):
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
        out = {metric_keys.system(k): round(sum(v) / len(v), 2) for k, v in samples.items()}
        out[metric_keys.system("cpu_utilization_percentage")] = float(self._psutil.cpu_percent(None))
        if self._cuda is not None:
            import torch

            peak = torch.cuda.max_memory_allocated(self._cuda)
            out[metric_keys.system("gpu_0_peak_allocated_megabytes")] = round(peak / 1e6, 2)
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


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which epochs of a run write a checkpoint: every `every` epochs, each epoch that becomes the
    run's selected epoch (so the selected epoch's weights and out-of-fold predictions exist, which
    the best trial, its plots and the final model read), and the last epoch (`max_epochs`).

    Writing every epoch cost a smoke trial a large share of each epoch (all folds' weights and Adam
    moments, hashed, copied by Ray; docs/architecture.md, "What a trial costs besides training");
    a crash now retrains up to `every - 1` epochs instead, from
    the newest checkpoint, and reports them again (the driver keeps the retrained values:
    `tuning.records.outcome.lineage`).

    Args:
        every: `train.checkpoint_every`, positive; 1 = every epoch.
        max_epochs: the run's last epoch.
    """

    every: int
    max_epochs: int

    def due(self, epoch: int, selected_epoch: int | None = None) -> bool:
        """Whether `epoch` (1-based) writes one; `selected_epoch`: the run's selected epoch after
        this one (None for a run without selection, such as a final model)."""
        return epoch >= self.max_epochs or epoch % self.every == 0 or selected_epoch == epoch


class Resumption:
    """What a run restarted from a checkpoint carries into its first report: the restored epoch's
    metrics (`restored`; the driver logs that epoch if its report was lost) and the damaged
    checkpoints passed over (`skipped`). `load` restores `cv` (and `selection`) from Ray Train's
    checkpoint, if any; `first_report` hands both over once."""

    def __init__(self) -> None:
        self.restored: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.from_epoch = 0

    @classmethod
    def load(cls, checkpoint: Checkpoint | None, cv: CrossValidation, selection: EpochSelection | None,
             run_dir: str | None = None) -> Resumption:
        """`checkpoint`: Ray Train's (None on a first start); `run_dir`: the run's folder, whose
        newest checkpoint folder is used when Ray Train has none to give (its snapshot was damaged
        and moved aside, `tuning.records.state_files`)."""
        import ray.train

        from tuning.records.checkpoints import restorable

        out = cls()
        if checkpoint is None and run_dir:
            # checkpoint folders only: the damaged snapshot moved aside is named checkpoint_manager_...
            found = sorted(p for p in Path(run_dir).glob("checkpoint_*")
                           if p.is_dir() and not p.name.startswith("checkpoint_manager"))
            checkpoint = ray.train.Checkpoint.from_directory(str(found[-1])) if found else None
        if checkpoint is not None:  # a restarted worker group (or a resumed search) continues
            with checkpoint.as_directory() as d:
                reader = restorable(d, log=out.skipped.append)
                if reader is not None:
                    cv.load_state_dict(reader.state(map_location=cv.device))
                    out.restored = reader.metrics()
                    if selection is not None:  # epochs after the checkpoint are retrained and re-selected
                        selection.restore(out.restored)
            for message in out.skipped:
                print(f"[cfcml] {message}", flush=True)
        out.from_epoch = cv.epoch
        return out

    def first_report(self) -> tuple[dict[str, Any] | None, list[str]]:
        """(restored metrics or None, skipped checkpoints) the first time, then (None, [])."""
        restored, skipped = self.restored or None, self.skipped
        self.restored, self.skipped = {}, []
        return restored, skipped


def _detached(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a state dict whose tensors training no longer changes (a clone of each: much
    cheaper than writing them; the figures are in docs/architecture.md, "Stages")."""
    import torch
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, state)


def report_epoch(report: EpochReport, saved: tuple[dict[str, Any], pd.DataFrame | None, pd.DataFrame | None] | None,
                 due: bool, local: bool) -> None:
    """Report one epoch to Ray Train, with a checkpoint when `due` (every rank alike).

    Args:
        report: the epoch's `EpochReport`.
        saved: on the rank that writes (rank 0) of a due epoch, (state dict, out-of-fold frame or
            None, test frame or None) for `tuning.records.checkpoints.write_checkpoint`; else None.
        due: whether this epoch checkpoints (`CheckpointPolicy.due`).
        local: whether the run's storage is a local folder. Then the files are written straight
            into it, on Ray Train's upload thread, from a copy of the state taken now: the next
            epoch trains meanwhile (Ray Train delivers reports in order, so that epoch's report
            waits for this write, and the run's end waits for the last one); nothing is copied.
            On remote storage they are written to a local folder, which Ray Train uploads before
            `report` returns.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    from tuning.records.checkpoints import write_checkpoint

    values = report.to_dict()
    if not due:
        ray.train.report(values)
        return
    metrics = report.to_dict(with_restart=False)  # the checkpoint's own file: no one-off restart fields
    if not local:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if saved is not None:
                write_checkpoint(tmp, saved[0], metrics, saved[1], saved[2])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(values, checkpoint=checkpoint)
        return
    checkpoint, write = None, None
    if saved is not None:
        state, oof, test = _detached(saved[0]), saved[1], saved[2]
        storage = ray.train.get_context().get_storage()

        def write(_placeholder: Checkpoint, name: str) -> Checkpoint:
            path = storage.build_checkpoint_path_from_name(name)
            write_checkpoint(path, state, metrics, oof, test)
            return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)

        # Ray Train wants a folder to report; `write` fills the real one, this one is removed.
        checkpoint = ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="cfcml-checkpoint-"))
    ray.train.report(values, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=write, delete_local_checkpoint_after_upload=True)


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """What every Ray Train worker runs: `job.experiment` trained on the folds of the prepared
    dataset (all development rows for a final model) in lockstep, one `EpochReport` per epoch.

    Each worker (rank) trains every fold (`cfcml.training.CrossValidation`, DDP across the ranks
    when there are several), resumes from the newest intact checkpoint when there is one
    (`Resumption`), reports each epoch to Ray Train with the running selected score of a CV run
    (`tuning.records.outcome.EpochSelection`) and, on rank 0, the machine's `SystemMetrics`, and
    checkpoints when `CheckpointPolicy` says so (`report_epoch`). A final model or a comparison's
    run (`job.predict_test`) predicts the held-out test split once, after its last epoch.

    Args:
        config: Ray Train's `train_loop_config`: {`LOOP_CONFIG`: the run's `LoopConfig`}.

    Returns:
        None; everything leaves through `ray.train.report`. A run whose checkpoint already holds
        its last epoch only reports that epoch again (its report may never have reached the driver).
        A diverged run (`cfcml.training.TrainingDiverged`) returns early instead of raising, so Ray
        Train does not restart it: rank 0 writes `loop.failure_file`, which `fit` turns into the
        exception on the caller's side.

    Raises:
        Whatever a worker hits otherwise (e.g. OSError writing a checkpoint): Ray Train restarts the
        worker group from the last checkpoint up to `train.max_failures` times.
    """
    import ray.train
    import ray.train.torch
    import torch

    from cfcml.data.manifest import PreparedDataset
    from cfcml.evaluation.metrics import selection_key
    from cfcml.training import CrossValidation, TrainingDiverged, cv_splits, prediction_frame
    from tuning.records.outcome import EpochReport, EpochSelection

    t_start = time.perf_counter()
    _quiet_report_log()
    loop = config[LOOP_CONFIG]
    job = loop.job
    cfg = job.experiment
    torch.set_num_threads(max(int(cfg.train.cpus_per_worker), 1))
    prepared = PreparedDataset.load(job.prepared_dir)
    cv = CrossValidation(prepared, cv_splits(prepared, job.final), cfg, ray.train.torch.get_device())
    # The running selected score (max over this run's epochs so far), reported with every epoch of
    # a CV run: what ASHA, Optuna and the best-trial choice act on (tuning.records.outcome.EpochSelection).
    spec = prepared.spec
    selection = None if job.final else EpochSelection(
        selection_key(spec.task, len(spec.classes), spec.selection_metric, cfg.train.selection_metric), also=job.also)
    resumption = Resumption.load(ray.train.get_checkpoint(), cv, selection, loop.run_dir)
    policy = CheckpointPolicy(cfg.train.checkpoint_every, job.max_epochs)

    t_ready = time.perf_counter()
    rank = ray.train.get_context().get_world_rank()
    compute_s = 0.0  # this process's time in training/validation, to tell start-up overhead apart
    if resumption.restored and cv.epoch >= job.max_epochs:
        # The run had finished, but its last report may never have reached the driver (killed in
        # between): send that epoch's metrics once more; the tracker logs an epoch only once.
        restored, _ = resumption.first_report()
        assert restored is not None  # the first report of a restored run carries its metrics
        report = EpochReport.from_dict(restored)
        report.restored, report.resumed_from_epoch = restored, resumption.from_epoch
        ray.train.report(report.to_dict())
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
                if rank == 0 and loop.failure_file:
                    _write_failure(loop.failure_file, exc)
                return
            compute_s += time.perf_counter() - t0
            if selection is not None:
                metrics.update(selection.update(metrics))
            if system is not None:
                metrics.update(system.epoch())
            test = None
            if job.predict_test and cv.epoch == job.max_epochs:
                # The one look at the held-out test split, after training has ended: every fold's
                # model (one for a final model) with its own normaliser, probabilities averaged.
                frame = prepared.test_frame()
                probs = cast("np.ndarray", sum(cv.predict(f, prepared.dataset(frame, f.normalizer))
                                               for f in cv.folds)) / len(cv.folds)
                test = prediction_frame(frame, probs, prepared.spec.classes)
            restored, skipped = resumption.first_report()
            # Every rank decides alike (the same epoch and selection), so all write or none do.
            due = policy.due(cv.epoch, None if selection is None else selection.epoch)
            report = EpochReport(metrics, time_compute_s=compute_s, time_setup_s=t_ready - t_start,
                                 resumed_from_epoch=resumption.from_epoch, checkpointed=due, restored=restored,
                                 checkpoints_skipped=skipped, scan_backend=cv.scan_backend)
            report_epoch(report, (cv.state_dict(), oof, test) if due and rank == 0 else None, due,
                         local=loop.run_dir is not None)
    finally:
        if system is not None:
            system.close()


FAILURE_FILE = "cfcml_diverged.json"  # in the Ray Train run's folder: why the workers stopped


def _write_failure(path: str, exc: TrainingDiverged) -> None:
    import json
    import os

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps({"fold": exc.fold, "epoch": exc.epoch, "what": exc.what}), encoding="utf-8")
    os.replace(tmp, path)


def trainer_class(workers: int, use_gpu: bool) -> type:
    """The Ray Train trainer for a run: `TorchTrainer` (a torch process group across the workers,
    CUDA devices set) for several workers or a GPU; for one CPU worker, Ray Train's
    `DataParallelTrainer` without a backend, which runs the same loop with the same checkpoints,
    restarts and reports but needs no process group. It keeps torch out of the processes that build
    and drive the trainer (Tune's trial actor, Ray Train's controller): `ray.train.torch` imports
    torch in each of them, every trial (docs/architecture.md, "What a trial costs besides training").

    Args:
        workers: `train.workers`, positive.
        use_gpu: whether the workers get GPUs (`train.gpus_per_worker > 0`).
    """
    if workers == 1 and not use_gpu:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return DataParallelTrainer
    from ray.train.torch import TorchTrainer

    return TorchTrainer


def ray_train_name(name: str) -> str:
    """`name` as a Ray Train run's name: ASCII. Ray Train tags its metrics with the run's name, and
    Ray encodes metric tags as ASCII (`ray._raylet.Metric.record`, python/ray/includes/metric.pxi
    upstream), so a run named after a search called "süche" failed in its controller with "'ascii'
    codec can't encode character '\\xfc'" (Ray 2.60). An ASCII name is kept as it is; another
    loses its accents (NFKD), other non-ASCII characters become "_", and 8 hex digits of its hash
    keep two such names apart: "final_süche_1a2b" -> "final_suche_1a2b-<hash>". The run's folder is
    named the same."""
    if name.isascii():
        return name
    import hashlib
    import unicodedata

    plain = "".join(c if c.isascii() else "" if unicodedata.combining(c) else "_"
                    for c in unicodedata.normalize("NFKD", name))
    return f"{plain}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def fit(job: TrainJob, name: str, storage_path: str, metric: str | None, callbacks: list | None = None,
        label: str | None = None) -> Any:
    """Run `train_loop_per_worker` on a Ray Train trainer (`trainer_class`) as the run
    `ray_train_name(name)`; a rerun with the same name resumes.

    Ray Train keeps the best checkpoint by `metric` and the latest one (two if no metric), so a
    damaged latest checkpoint leaves an older one to restart from. Worker crashes restart the
    worker group from the last checkpoint up to `train.max_failures` times; a diverged run
    (`cfcml.training.TrainingDiverged`) is not retried: the workers stop at once and `fit` raises
    TrainingDiverged naming `label` (default `name`), the fold and the epoch.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    name = ray_train_name(name)
    t = job.experiment.train
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    keep = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order="max") \
        if metric else CheckpointConfig(num_to_keep=2)
    failure = Path(storage_path) / name / FAILURE_FILE
    failure.unlink(missing_ok=True)  # a rerun (a resumed search) starts without the last run's verdict
    trainer = trainer_class(t.workers, use_gpu)(
        train_loop_per_worker,
        # run_dir: where this run's checkpoint folders are, should Ray Train's snapshot be lost
        train_loop_config={LOOP_CONFIG: LoopConfig(
            job, failure_file=str(failure), run_dir=None if "://" in storage_path else str(Path(storage_path) / name))},
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

        data = json.loads(failure.read_text(encoding="utf-8"))
        raise TrainingDiverged(data["fold"], data["epoch"], data["what"], trial=label or name)
    return result
