"""The per-worker training loop: K cross-validation folds of one configuration, in lockstep.

Each epoch trains every fold's model on its training part and evaluates it on its validation
part, so the caller gets a cross-validated score after every epoch (what ASHA stops trials on).
The same loop trains the final model: one "fold" whose training part is all development data
and which has no validation part.

Distributed data parallel is optional: when `torch.distributed` is initialised (Ray Train does
it), models are wrapped in DDP, training batches are sharded across ranks, validation is split
across ranks and gathered, and prototype banks are averaged so every rank holds the same state.
Nothing here knows about Ray or MLflow.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from cfcml.config import ExperimentConfig, OptimConfig
from cfcml.data.dataset import CachedDataset, ClassBalancedBatchSampler
from cfcml.data.manifest import PreparedDataset
from cfcml.data.normalize import TabularNormalizer
from cfcml.evaluation import metric_keys
from cfcml.evaluation.metrics import compute_metrics
from cfcml.graphs import GraphedForward, GraphedStep
from cfcml.losses import CFCMLLoss
from cfcml.networks import CFCML, build_model
from cfcml.networks.mamba import model_scan_backend
from cfcml.predict import ModelInputs, predict_proba

if TYPE_CHECKING:
    from cfcml.networks.fusion import FusionModel


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite value (a training loss, or the validation probabilities of
    weights that went NaN/inf): the run cannot recover, so it stops at the end of that fold's epoch,
    before the fold is validated or checkpointed.

    Args:
        fold: the fold index (0 for a final model's single "fold").
        epoch: the epoch that diverged, counted from 1.
        what: the non-finite values, e.g. "training loss: loss=nan, ce=inf".
        trial: who trained it ("trial 1a2b", a run name); filled in by the caller that knows it.
    """

    def __init__(self, fold: int, epoch: int, what: str, trial: str | None = None):
        self.fold, self.epoch, self.what, self.trial = fold, epoch, what, trial
        who = f"{trial}, " if trial else ""
        super().__init__(f"training diverged: {who}fold {fold}, epoch {epoch}: non-finite {what} "
                         f"(lower optim.lr, or check the data)")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray processes with its fields
        return type(self), (self.fold, self.epoch, self.what, self.trial)


def _finite_everywhere(ok: bool, device: torch.device) -> bool:
    """`ok` on every data-parallel rank (one all-reduce per epoch), so that all ranks stop together
    rather than some waiting forever in a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


@dataclass
class Split:
    """One fold: rows to train on and rows to validate on (None for the final model)."""

    train: pd.DataFrame
    val: pd.DataFrame | None


def cv_splits(prepared: PreparedDataset, final: bool = False) -> list[Split]:
    """The splits a run trains on: each fold's (training, validation) development rows, or, with
    `final`, one split of all development rows without validation. Never a test row."""
    if final:
        return [Split(prepared.dev_frame(), None)]
    return [Split(*prepared.fold_frames(k)) for k in range(prepared.folds)]


@dataclass
class Fold:
    model: CFCML | FusionModel
    net: nn.Module  # `model`, or its DDP wrapper; torch.compile's wrapper of it after _prepare_step (train.compile)
    criterion: CFCMLLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    normalizer: TabularNormalizer
    train_loader: DataLoader
    val_set: CachedDataset | None
    val: pd.DataFrame | None  # the validation rows (manifest columns)
    graphed: GraphedStep | None = None  # the CUDA-graph step (train.cuda_graphs), set by _prepare_step
    eval_graphed: GraphedForward | None = None  # and the CUDA-graph validation forward
    step_ready: bool = False  # _prepare_step has run (the step options of `train` applied once)


def prediction_frame(rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """patient_id, label and one prob_<class> column per class: how predictions are stored."""
    out = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
    out.insert(0, "label", rows["label"].to_numpy())
    out.insert(0, "patient_id", rows["patient_id"].to_numpy())
    return out


def frame_probs(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """[N, C] probabilities back from a `prediction_frame`."""
    return frame[[f"prob_{c}" for c in classes]].to_numpy()


def make_optimizer(model: CFCML | FusionModel, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.Adam:
    """Adam over two groups (the image encoders may learn at `encoder_lr_mult` times the rate).

    `fused` (default: when the parameters are on CUDA) updates all parameters in one kernel instead
    of a few per tensor; on CPU the default stays the for-each implementation.
    """
    enc = model.encoder_parameters()
    enc_ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if id(p) not in enc_ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if enc:
        groups.append({"params": enc, "lr": cfg.lr * cfg.encoder_lr_mult})
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def largest_batch(step: Callable[[int], Any], start: int, budget_bytes: int | None = None,
                  device: torch.device | str | None = None) -> int:
    """The largest of start, start/2, start/4, ..., 1 for which `step(batch)` runs within memory.

    `step(b)` runs one training step (forward, loss, backward) on b samples. A batch does not fit
    when the step raises a CUDA out-of-memory error or, with `budget_bytes`, when the step needs more:
    on CUDA its peak allocated memory, on CPU the bytes of the tensors autograd kept for the backward
    pass (the activations, which grow with the batch). Raises the last error when even 1 does not fit.

    Args:
        device: where `step` runs ("cuda", "cuda:1", "cpu"); decides how its memory is measured.
            Default: CUDA when it is available. A CPU step on a machine with a GPU must say "cpu".
    """
    if start < 1:
        raise ValueError(f"start must be >= 1, got {start}")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    batch = start
    while True:
        try:
            used = _step_memory(step, batch, device)
            if budget_bytes is None or used <= budget_bytes:
                return batch
            error: BaseException = torch.cuda.OutOfMemoryError(
                f"batch {batch} needs {used / 2**20:.1f} MiB, over the budget of {budget_bytes / 2**20:.1f} MiB")
        except torch.cuda.OutOfMemoryError as exc:
            error = exc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the failed batch's blocks back before the next try
        if batch == 1:
            raise error
        batch //= 2


def _step_memory(step: Callable[[int], Any], batch: int, device: torch.device) -> int:
    """Bytes a step needs: its peak CUDA allocation on a CUDA device, else autograd's saved tensors."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(saved.values())


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    """Linear warm-up for `warmup_epochs`, then step decay (x gamma every `step_size` epochs)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    return cfg.gamma ** ((epoch - cfg.warmup_epochs) // cfg.step_size)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels-last memory order: channels_last for 2D images, channels_last_3d for volumes."""
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CrossValidation:
    """K folds (models, optimisers, schedulers, prototype banks) trained together.

    `scan_backend` is the selective scan the models' Mamba blocks run on `device`
    (`cfcml.networks.mamba.model_scan_backend`: "chunked" for `model.scan: auto` on CPU, "none"
    without Mamba blocks). Building raises `cfcml.networks.scan_check.ScanSelfCheckError` when
    `model.scan: triton` fails its self-check on a CUDA device.
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        splits: list[Split],
        cfg: ExperimentConfig,
        device: torch.device | str = "cpu",
    ):
        self.prepared, self.spec, self.cfg = prepared, prepared.spec, cfg
        self.device = torch.device(device)
        self.rank, self.world = _world()
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.epoch = 0  # epochs completed
        # Called as step_hook(fold_index, fold) after every optimiser step (tests, diagnostics).
        self.step_hook: Callable[[int, Fold], None] | None = None
        self.folds = [self._make_fold(k, s) for k, s in enumerate(splits)]
        # What the Mamba blocks' selective scan runs on this device ("none" without Mamba blocks),
        # resolved now, eagerly: on CUDA the triton scan's self-check runs here, before any
        # torch.compile or CUDA graph capture of the step (cfcml/networks/scan_check.py).
        self.scan_backend = model_scan_backend(self.folds[0].model, self.device)

    def _make_fold(self, k: int, split: Split) -> Fold:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed * 1000 + k)  # same initial weights on every rank
        model = build_model(self.spec, cfg.model).to(self.device)
        net: nn.Module = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        counts = np.bincount(split.train["label"].to_numpy(), minlength=len(self.spec.classes))
        criterion = CFCMLLoss.from_config(cfg.loss, num_modalities=model.num_modalities,
                                          num_classes=len(self.spec.classes), dim=cfg.model.dim,
                                          class_counts=counts.tolist()).to(self.device)
        optimizer = make_optimizer(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg.optim))
        # Statistics from the training part only: validation values never shape the inputs.
        normalizer = self.prepared.fit_normalizer(split.train)
        train_set = self.prepared.dataset(split.train, normalizer, augment=True, seed=cfg.train.seed + k)
        train_loader = self._train_loader(train_set, split.train["label"].to_numpy(), k)
        val_set = None
        if split.val is not None:
            val_set = self.prepared.dataset(split.val, normalizer, augment=False)
        return Fold(model, net, criterion, optimizer, scheduler, normalizer, train_loader, val_set, split.val)

    def _train_loader(self, train_set: CachedDataset, labels: np.ndarray, k: int) -> DataLoader:
        t = self.cfg.train
        per_rank = max(t.batch_size // self.world, 1)
        # Pinned host memory makes the host-to-device copies asynchronous (ModelInputs.from_batch
        # copies with non_blocking); workers stay alive across epochs and keep batches queued ahead.
        common: dict[str, Any] = dict(num_workers=t.loader_workers, pin_memory=self.device.type == "cuda",
                                      persistent_workers=t.loader_workers > 0)
        if t.loader_workers > 0:
            common["prefetch_factor"] = t.prefetch_factor
        if t.balanced_sampler:
            sampler = ClassBalancedBatchSampler(
                labels, per_rank, seed=t.seed + k, num_replicas=self.world, rank=self.rank
            )
            return DataLoader(train_set, batch_sampler=sampler, **common)
        shuffler: DistributedSampler[int] = DistributedSampler(train_set, num_replicas=self.world, rank=self.rank,
                                                               shuffle=True, seed=t.seed + k)
        # Drop a ragged last batch (its prototypes rest on one or two samples) when there are
        # at least two full batches to train on.
        return DataLoader(train_set, batch_size=per_rank, sampler=shuffler,
                          drop_last=len(train_set) >= 2 * t.batch_size, **common)

    # ---------------------------------------------------------------- training
    def _autocast(self, cache_enabled: bool = True):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=cache_enabled)

    def _prepare_step(self, fold: Fold) -> None:
        """Once per fold, before its first step: the CUDA-only step options of `train` (docs/gpu.md)."""
        if fold.step_ready:
            return
        t = self.cfg.train
        if self.device.type == "cuda":
            if t.tf32:  # TF32 tensor cores for float32 matmuls too (cuDNN convolutions use them already)
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv kernels once
            dims = {m.dims for m in self.spec.modalities}
            if t.channels_last and len(dims) == 1:  # one memory order for every conv weight
                # Module.to takes memory_format at run time; torch's annotations omit it
                fold.model.to(memory_format=torch.channels_last_3d  # type: ignore[call-overload]
                              if dims == {3} else torch.channels_last)
            if t.compile:
                fold.net = cast(nn.Module, torch.compile(fold.net))  # an OptimizedModule for a module
            if t.cuda_graphs:
                fold.graphed = self._graphed_step(fold)
                if fold.graphed is not None:
                    fold.eval_graphed = GraphedForward(fold.model, t.batch_size, pool=fold.graphed.pool)
        fold.step_ready = True

    def train_epoch(self, k: int) -> dict[str, float]:
        """One epoch of fold k: the mean of each loss term over its steps (`train_<term>`).
        Raises TrainingDiverged when a loss term is not finite (on any rank)."""
        fold = self.folds[k]
        self._prepare_step(fold)
        fold.net.train()
        fold.criterion.train()
        loader = fold.train_loader
        # A DataLoader given batch_size wraps its sampler in a BatchSampler (no set_epoch): reshuffle
        # whichever of the two has one, or every epoch would repeat the first epoch's order.
        samplers: tuple[object, ...] = (loader.sampler, loader.batch_sampler)
        for sampler in samplers:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
        channels_last = self.cfg.train.channels_last and self.device.type == "cuda"
        # Loss sums stay on the device, in float64 (the precision of the Python floats they replace),
        # and are read once per epoch: no host synchronisation per step.
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        drop = self._input_dropout(k)
        for batch in fold.train_loader:
            # a replay of the captured step, or None: then the eager step (same numbers)
            losses = fold.graphed(batch) if fold.graphed is not None else None
            if losses is None:
                inputs = ModelInputs.from_batch(batch, self.device)
                if drop is not None:  # train.modality_dropout / field_dropout (cfcml/evaluation/missing_inputs.py)
                    inputs = drop(inputs)
                if channels_last:
                    inputs.images = [_channels_last(x) for x in inputs.images]
                losses = self._step(fold, inputs, batch["label"].to(self.device, non_blocking=True))
            self._sync_bank(fold.criterion)
            if self.step_hook is not None:
                self.step_hook(k, fold)
            for key, value in losses.items():
                v = value.detach().to(torch.float64)
                sums[key] = sums[key] + v if key in sums else v
            steps += 1
        fold.scheduler.step()
        means = torch.stack(list(sums.values())).tolist() if sums else []
        bad = {key: v for key, v in zip(sums, means) if not math.isfinite(v)}
        if not _finite_everywhere(not bad, self.device):
            what = ", ".join(f"{key}={v}" for key, v in bad.items()) or "loss on another rank"
            raise TrainingDiverged(k, self.epoch + 1, f"training loss ({what})")
        return {metric_keys.train(key): v / max(steps, 1) for key, v in zip(sums, means)}

    def _input_dropout(self, k: int) -> Callable[[ModelInputs], ModelInputs] | None:
        """Fold k's dropout of whole inputs for this epoch, or None when both rates are 0. Its draws
        are seeded by (seed, fold, epoch, rank), so a resumed epoch draws the same."""
        tc = self.cfg.train
        if tc.modality_dropout == 0 and tc.field_dropout == 0:
            return None
        from cfcml.evaluation.missing_inputs import drop_inputs

        gen = torch.Generator().manual_seed(((tc.seed * 1009 + k) * 100003 + self.epoch) * 64 + self.rank)
        return lambda inputs: drop_inputs(inputs, tc.modality_dropout, tc.field_dropout, gen)

    def _step(self, fold: Fold, inputs: ModelInputs, y: torch.Tensor, cache_casts: bool = True
              ) -> dict[str, torch.Tensor]:
        """One training step on device tensors: forward, loss, backward, optimiser, prototype bank."""
        with self._autocast(cache_casts):
            out = inputs(fold.net)
        losses = fold.criterion(out.logits.float(), out.features.float(), y)
        fold.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        fold.optimizer.step()
        fold.criterion.update_bank()
        return losses

    def _graphed_step(self, fold: Fold) -> GraphedStep | None:
        """The fold's CUDA-graph step, or None (one warning line) where graphs cannot be used."""
        if self.world > 1:
            reason = "data-parallel (DDP) steps are not captured: their all-reduces would have to be too"
        elif self.cfg.train.modality_dropout > 0 or self.cfg.train.field_dropout > 0:
            reason = "whole-input dropout (train.modality_dropout / field_dropout) changes the inputs outside the step"
        elif not all(g.get("fused") for g in fold.optimizer.param_groups):
            reason = "the optimiser is not fused"
        else:
            t = self.cfg.train
            if getattr(self, "_graph_pool", None) is None:  # one memory pool for all folds' graphs (cfcml/graphs.py)
                self._graph_pool = torch.cuda.graph_pool_handle()
            return GraphedStep(functools.partial(self._step, fold), fold.optimizer, t.batch_size,
                               len(self.spec.classes), self.device, channels_last=t.channels_last,
                               pool=self._graph_pool)
        warnings.warn(f"train.cuda_graphs: {reason}; training eagerly", stacklevel=3)
        return None

    def _sync_bank(self, criterion: CFCMLLoss) -> None:
        """Average the prototype banks over ranks after each step (each rank saw its own shard),
        so every rank holds the same bank, as DDP keeps the same weights."""
        if self.world == 1:
            return
        bank = criterion.bank
        filled = bank.filled.to(torch.float32)
        dist.all_reduce(filled)  # how many ranks have seen each class
        for buf in (bank.p_bank, bank.q_bank):
            dist.all_reduce(buf)
            buf.copy_(F.normalize(buf, dim=-1) * (filled > 0).view(*([1] * (buf.dim() - 2)), -1, 1))
        bank.filled.copy_(filled > 0)

    def predict(self, fold: Fold, dataset: CachedDataset) -> np.ndarray:
        """Class probabilities [N, C] for `dataset`, computed across ranks and gathered."""
        idx = list(range(self.rank, len(dataset), self.world))
        loader = DataLoader(Subset(dataset, idx), batch_size=self.cfg.train.batch_size,
                            num_workers=self.cfg.train.loader_workers, pin_memory=self.device.type == "cuda")
        model = fold.eval_graphed if fold.eval_graphed is not None else fold.model
        local = predict_proba(model, loader, self.device, len(self.spec.classes), self._autocast)
        if self.world == 1:
            return local
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (idx, local))
        out = np.zeros((len(dataset), len(self.spec.classes)), np.float32)
        for part_idx, part in parts:
            out[part_idx] = part
        return out

    def run_epoch(self) -> tuple[dict[str, float], pd.DataFrame]:
        """Train and validate every fold once.

        Returns the metrics (per fold and mean over folds, `cv_<name>`) and the out-of-fold
        predictions of this epoch (one row per validated patient). Raises TrainingDiverged (fold,
        epoch) on a non-finite training loss or validation probabilities.
        """
        from cfcml.evaluation.calibration import brier_score

        metrics: dict[str, float] = {}
        per_fold: list[dict[str, float]] = []
        oof = []
        for k, fold in enumerate(self.folds):
            train_stats = self.train_epoch(k)
            for key, value in train_stats.items():
                metrics[metric_keys.fold(key, k)] = value
            if fold.val_set is None or fold.val is None:
                continue
            probs = self.predict(fold, fold.val_set)
            if not np.isfinite(probs).all():  # finite losses, yet the weights went NaN/inf at the last step
                raise TrainingDiverged(k, self.epoch + 1, "validation probabilities (the weights are not finite)")
            labels = fold.val["label"].to_numpy()
            fold_metrics = compute_metrics(self.spec.task, labels, probs)
            fold_metrics["loss"] = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                                    torch.as_tensor(np.array(labels), dtype=torch.long)))
            fold_metrics[metric_keys.BRIER] = brier_score(labels, probs)  # a search objective may minimise it
            per_fold.append(fold_metrics)
            for key, value in fold_metrics.items():
                metrics[metric_keys.fold(metric_keys.val(key), k)] = value
            frame = prediction_frame(fold.val, probs, self.spec.classes)
            frame.insert(1, "fold", k)
            oof.append(frame)
        for key in per_fold[0] if per_fold else []:
            values = [m[key] for m in per_fold]
            metrics[metric_keys.cv(key)] = float(np.nanmean(values)) if not all(map(math.isnan, values)) else math.nan
        train_losses = [metrics[metric_keys.fold(metric_keys.TRAIN_LOSS, k)] for k in range(len(self.folds))]
        metrics[metric_keys.TRAIN_LOSS] = float(np.mean(train_losses))
        self.epoch += 1
        metrics["epoch"] = self.epoch
        return metrics, (pd.concat(oof, ignore_index=True) if oof else pd.DataFrame())

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "folds": [
                {
                    "model": f.model.state_dict(),
                    "criterion": f.criterion.state_dict(),
                    "optimizer": f.optimizer.state_dict(),
                    "scheduler": f.scheduler.state_dict(),
                    "normalizer": f.normalizer.state_dict(),
                }
                for f in self.folds
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["folds"]) != len(self.folds):
            raise ValueError(f"checkpoint has {len(state['folds'])} folds, this run has {len(self.folds)}")
        self.epoch = int(state["epoch"])
        for fold, fs in zip(self.folds, state["folds"]):
            fold.model.load_state_dict(fs["model"])
            fold.criterion.load_state_dict(fs["criterion"])
            fold.optimizer.load_state_dict(fs["optimizer"])  # new state tensors: capture again
            if fold.graphed is not None:
                fold.graphed.release()
            fold.scheduler.load_state_dict(fs["scheduler"])
            if "normalizer" in fs:  # refit on the same training rows: it must match what was saved
                fold.normalizer.load_state_dict(fs["normalizer"])
