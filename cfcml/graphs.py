"""The training step as one CUDA graph (`train.cuda_graphs`, docs/gpu.md).

A training step of CFCML launches thousands of small kernels (the Swin-T of Derm7pt, the scan's
chunks and the loss's many small products); on a fast GPU the host cannot launch them as fast as
the GPU runs them. A CUDA graph records the whole step once (forward, CFCMLLoss, backward, fused
Adam, the prototype bank's update) and replays it with one launch. This follows PyTorch's
"whole network capture" recipe (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs):

- warm-up: the first `warmup` steps of a fold run eagerly on a side stream (lazy initialisation:
  Adam's state, cuDNN's algorithm search, cuBLAS workspaces). They are ordinary training steps;
- static buffers: each batch is copied into the same device tensors, whose addresses the graph
  holds; the losses it returns are the graph's own output tensors, overwritten by the next replay;
- capture: the gradients are set to None first, so that backward allocates them in the graph's
  private memory pool; Adam must be fused (its step counters live on the device), and its groups
  are marked `capturable` during the capture only (the fused kernel's arithmetic does not depend
  on that flag). The learning rate is a Python float baked into the graph, so the step is captured
  again whenever the scheduler changes it (at most once an epoch);
- what the graph cannot do runs eagerly, with the same numbers: a batch of another shape than the
  full batch (the ragged last batch: graphing it too would cost a second graph's memory for one
  step an epoch, and dropping it would change what is trained), and every step after a failed
  capture (one warning, then eager to the end).

Memory: every graph keeps a private memory pool for the tensors it allocates (activations,
gradients). CrossValidation trains K folds in turn on one device, so K graphs with K pools would hold
K steps' activations at once; instead all graphs of one CrossValidation (every fold's step and
validation forward) share one pool. That is safe here because no graph reads memory another graph
wrote: each replay's inputs are static buffers outside the pool (and the parameters, optimiser state
and prototype bank, also outside it), each replay recomputes its gradients from scratch (captured
with .grad None), and each replay's outputs (losses, logits) are consumed on the same stream before
the next replay of any graph. Graphs never run concurrently (one stream).

Values the host would have to read during a step break a capture. The step has none: the loss
sums stay on the device (cfcml.training), CFCMLLoss counts classes with a one-hot sum instead of
torch.bincount (which reads the largest label on the host) and skips its label-range check while a
capture is under way: `GraphedStep` checks the labels of each batch on the host instead, before
copying them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cfcml.losses import _check_labels
from cfcml.predict import ModelInputs

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

# A step: (inputs, labels, cache_casts) -> {"loss", "ce", "sam", "up", "cp"}; cache_casts is
# autocast's weight-cast cache, off inside a capture (the cache's tensors would outlive it).
Step = Callable[[ModelInputs, Tensor, bool], dict[str, Tensor]]


def batch_tensors(batch: dict[str, Any]) -> list[Tensor]:
    """A collated batch's tensors in a fixed order: images..., num, num_missing, cat, label."""
    return [*batch["images"], batch["num"], batch["num_missing"], batch["cat"], batch["label"]]


class GraphedStep:
    """One fold's training step, captured as one CUDA graph and replayed for every full batch.

    Args:
        step: runs one training step on device tensors (forward, loss, zero_grad(set_to_none=True),
            backward, optimiser step, bank update) and returns its loss tensors.
        optimizer: the fold's optimiser; must be a fused Adam (ValueError otherwise).
        batch_size: samples of a full batch; batches of other sizes run eagerly.
        num_classes: labels must lie in [0, num_classes) (ValueError naming the bad values).
        device: a CUDA device (ValueError otherwise).
        channels_last: keep the static image buffers in channels-last order (train.channels_last).
        warmup: eager full-batch steps before the first capture, >= 1.
        pool: a memory pool (torch.cuda.graph_pool_handle()) shared with other graphs, e.g. the
            other folds' steps and the validation forwards (the module docstring says when it is safe).

    Call it with a collated batch (host or device tensors): it returns the step's losses, or None
    when the caller must run the step eagerly itself (a batch of another shape, or after a failed
    capture). The returned tensors are overwritten by the next replay: copy what you keep.
    """

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, batch_size: int, num_classes: int,
                 device: torch.device | str, channels_last: bool = False, warmup: int = 2,
                 pool: _POOL_HANDLE | None = None):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("CUDA graph capture of the step needs a fused optimiser (fused=True)")
        if warmup < 1 or batch_size < 1:
            raise ValueError(f"warmup and batch_size must be >= 1, got {warmup} and {batch_size}")
        self.step, self.optimizer = step, optimizer
        self.batch_size, self.num_classes, self.channels_last = batch_size, num_classes, channels_last
        self.warmup, self.warmed, self.pool = warmup, 0, pool
        self.failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lrs: tuple[float, ...] | None = None  # the learning rates baked into the graph
        self.static: list[Tensor] | None = None
        self.losses: dict[str, Tensor] | None = None
        self.grads: list[tuple[Tensor, Tensor | None]] = []
        self.replays = self.captures = 0  # so far (tests, benchmarks)
        self._eager_since_replay = False

    # ---------------------------------------------------------------- public
    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor] | None:
        if self.failed:
            return None
        tensors = batch_tensors(batch)
        labels = tensors[-1]
        if not labels.is_cuda:  # the check the capture skips; on the host it costs no synchronisation
            _check_labels(labels, labels.shape[0], self.num_classes)
        if labels.shape[0] != self.batch_size or (
                self.static is not None and any(a.shape != b.shape for a, b in zip(tensors, self.static))):
            self._eager_since_replay = True
            return None
        if self.warmed < self.warmup:  # full batches only: cuDNN must have tuned the captured shapes
            self.warmed += 1
            return self._side_stream_step(tensors)
        lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        try:
            self._copy_in(tensors)
            if self.graph is None or lrs != self.lrs:
                self._capture(lrs)
        except Exception as exc:  # noqa: BLE001 - any capture failure: warn once, then train eagerly
            self.release()
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)  # the capture's gradients were never computed
            warnings.warn(f"train.cuda_graphs: capturing the training step failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); training eagerly", stacklevel=2)
            return None
        assert self.graph is not None and self.losses is not None
        self.graph.replay()
        self.replays += 1
        if self._eager_since_replay:  # an eager step re-created .grad: point it at the graph's again
            for p, g in self.grads:
                p.grad = g
            self._eager_since_replay = False
        return self.losses

    def release(self) -> None:
        """Drop the graph; its memory goes back to the pool (the next full batch captures again).

        Call it when tensors the graph reads are replaced, e.g. after optimizer.load_state_dict.
        """
        self.graph, self.losses, self.lrs, self.grads = None, None, None, []

    # ---------------------------------------------------------------- inside
    def _inputs(self, tensors: list[Tensor]) -> tuple[ModelInputs, Tensor]:
        *images, num, num_missing, cat, labels = tensors
        return ModelInputs(list(images), num, num_missing, cat), labels

    def _to_device(self, x: Tensor, image: bool, own: bool = False) -> Tensor:
        """x on the device (channels-last images if asked); `own`: never the caller's tensor itself."""
        y = x.to(self.device, non_blocking=True)
        if image and self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last_3d if y.dim() == 5 else torch.channels_last)
        return y.clone(memory_format=torch.preserve_format) if own and y.data_ptr() == x.data_ptr() else y

    def _side_stream_step(self, tensors: list[Tensor]) -> dict[str, Tensor]:
        """An ordinary eager step on a side stream (the recipe's warm-up), joined back to the current one."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        n_images = len(tensors) - 4
        with torch.cuda.stream(side):
            moved = [self._to_device(x, i < n_images) for i, x in enumerate(tensors)]
            losses = self.step(*self._inputs(moved), True)
        current.wait_stream(side)
        for value in losses.values():  # used (and freed) on the current stream from now on
            value.record_stream(current)
        self._eager_since_replay = True
        return losses

    def _copy_in(self, tensors: list[Tensor]) -> None:
        n_images = len(tensors) - 4
        if self.static is None:
            self.static = [self._to_device(x, i < n_images, own=True) for i, x in enumerate(tensors)]
            return
        for dst, src in zip(self.static, tensors):
            dst.copy_(src, non_blocking=True)

    def _capture(self, lrs: tuple[float, ...]) -> None:
        assert self.static is not None
        self.release()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
        groups = self.optimizer.param_groups
        for g in groups:
            g["capturable"] = True
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may call CUDA while we capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                losses = self.step(*self._inputs(self.static), False)
        finally:
            for g in groups:
                g["capturable"] = False
        self.graph, self.losses, self.lrs = graph, losses, lrs
        self.captures += 1
        self.grads = [(p, p.grad) for g in groups for p in g["params"]]


class GraphedForward(nn.Module):
    """An evaluation forward (`model(images, num, num_missing, cat)` under no_grad, eval mode)
    captured as one CUDA graph for full batches and replayed; anything else runs `model` eagerly.

    Used by validation with `train.cuda_graphs` (cfcml.training.CrossValidation.predict). The
    first `warmup` full batches run eagerly on a side stream, the next is captured under the
    caller's autocast state (with autocast's cast cache off inside the capture). Batches of another
    shape, training mode, grad mode, or a change of autocast state run eagerly; a failed capture
    warns once and leaves it eager. The output's tensors are the graph's own: the next replay
    overwrites them (predict_proba copies the probabilities to the host first).

    Args:
        model: the network, on a CUDA device; its parameters and buffers are read in place, so
            training between replays is seen by the next replay.
        batch_size: samples of a full batch, >= 1.
        warmup: eager full batches before the capture, >= 1.
        pool: a memory pool shared with other graphs (`GraphedStep`).
    """

    def __init__(self, model: nn.Module, batch_size: int, warmup: int = 1, pool: _POOL_HANDLE | None = None):
        super().__init__()
        if batch_size < 1 or warmup < 1:
            raise ValueError(f"batch_size and warmup must be >= 1, got {batch_size} and {warmup}")
        self.model, self.batch_size, self.warmup, self.pool = model, batch_size, warmup, pool
        self.warmed, self.replays, self.failed = 0, 0, False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[Tensor] = []
        self.out: Any = None  # the captured model output (whatever `model` returns)
        self.autocast: tuple[bool, torch.dtype] | None = None

    def forward(self, images: list[Tensor], num: Tensor, num_missing: Tensor, cat: Tensor) -> Any:
        tensors = [*images, num, num_missing, cat]
        state = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if (self.failed or self.training or torch.is_grad_enabled() or not num.is_cuda
                or num.shape[0] != self.batch_size
                or (self.graph is not None and (state != self.autocast
                                                or any(a.shape != b.shape for a, b in zip(tensors, self.static))))):
            return self.model(images, num, num_missing, cat)
        if self.warmed < self.warmup:
            self.warmed += 1
            current = torch.cuda.current_stream(num.device)
            side = torch.cuda.Stream(num.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.model(images, num, num_missing, cat)
            current.wait_stream(side)
            return self.model(images, num, num_missing, cat)
        if self.graph is None:
            try:
                self.static = [x.clone(memory_format=torch.preserve_format) for x in tensors]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    with torch.autocast("cuda", dtype=state[1], enabled=state[0], cache_enabled=False):
                        self.out = self.model(self.static[:-3], *self.static[-3:])
                self.graph, self.autocast = graph, state
            except Exception as exc:  # noqa: BLE001 - warn once, then evaluate eagerly
                self.failed, self.graph, self.out, self.static = True, None, None, []
                warnings.warn(f"train.cuda_graphs: capturing the evaluation forward failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); evaluating eagerly", stacklevel=2)
                return self.model(images, num, num_missing, cat)
        for dst, src in zip(self.static, tensors):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.out
