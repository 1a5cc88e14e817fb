"""Typed, validated configuration loaded from YAML.

An experiment is `conf/experiments/<dataset>.yaml` (model, loss, optimiser and training sections),
optionally deep-merged with overrides (a search config's `overrides:` section, CLI flags). Every key
is checked against the dataclasses below at load time, so a typo or a bad value fails before any
work starts, with the key's dotted path in the message. Every float must be finite (`check_floats`,
`ALLOWS_INF`), and a YAML mapping may not name a key twice (`load_yaml`, for every YAML the
platform reads).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Dataclass = TypeVar("_Dataclass", bound="DataclassInstance")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration key is missing, unknown or has a bad value; the message names the key.

    `key` is the key as the raiser knows it: a section's own field name when a dataclass below
    rejects a value, which `from_dict` then prefixes with the section's dotted path.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.detail = key, message


def _positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"must be > 0, got {value!r}", name)


def _non_negative(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 0:
            raise ConfigError(f"must be >= 0, got {value!r}", name)


# Field metadata of a float (or tuple-of-floats) field that accepts -inf and inf, which its
# docstring must say; every other float setting must be finite, and none may be nan.
ALLOWS_INF = "allows_inf"


def _finite(value: float, path: str, allow_inf: bool = False) -> float:
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        wanted = "a number or -.inf / .inf" if allow_inf else "a finite number"
        raise ConfigError(f"expected {wanted}, got {value!r}", path)
    return value


def check_floats(section: DataclassInstance) -> None:
    """Every float of a config dataclass's fields (tuples' items too) is finite, or +-inf where the
    field's metadata holds `ALLOWS_INF`; nan never. ConfigError naming the field (items as
    `name[i]`). `from_dict` applies the same rule to every float it reads; each section below calls
    this first in `__post_init__`, so a config built in code is held to it too."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            if isinstance(v, float):
                _finite(v, f.name if i is None else f"{f.name}[{i}]", f.metadata.get(ALLOWS_INF, False))


# model.scan's values (the Literal below spells them again for from_dict's type check)
SCANS = ("auto", "sequential", "pscan", "chunked", "mamba_ssm", "triton")

# Each section checks its own values in __post_init__, so a config built in code (tests, scripts)
# is held to the same rules as one loaded from YAML.

# model.variant's established image+table fusion methods (cfcml/networks/fusion/, docs/model.md,
# "Fusion baselines"); each has its settings under model.fusion.<name>.
FUSION_VARIANTS = ("early_fusion", "film", "daft", "tab_attention", "tensor_fusion", "healnet")


def _stages(section: object, name: str, need_last: bool = False) -> None:
    """`name` holds encoder stages: a non-empty tuple of distinct numbers 1..4 (with 4 when `need_last`)."""
    stages = getattr(section, name)
    if not stages or not set(stages) <= {1, 2, 3, 4} or len(set(stages)) != len(stages):
        raise ConfigError(f"expected distinct encoder stages numbered 1..4, got {list(stages)}", name)
    if need_last and 4 not in stages:
        raise ConfigError(f"must include stage 4 (the encoder's later stages would get no gradient), "
                          f"got {list(stages)}", name)


@dataclass(frozen=True)
class EarlyFusionConfig:
    """`model.fusion.early_fusion`: the table as extra constant channels of every image, at the encoder's input.

    Args:
        source: "tokens" (the tokenizer's field tokens, flattened and mapped by a learned linear
            layer to `channels` values) or "raw" (the normalised table itself: each numeric value, 0
            where missing, its missing flag, and each categorical field one-hot, all zero where
            missing; no tokenizer).
        channels: extra input channels made from the tokens (source "tokens"), >= 1.
    """

    source: Literal["tokens", "raw"] = "tokens"
    channels: int = 8

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "channels")


@dataclass(frozen=True)
class FilmConfig:
    """`model.fusion.film`: feature-wise linear modulation (Perez et al. 2018) of image feature maps.

    Args:
        stages: encoder stages (1..4, distinct) whose output maps are scaled and shifted per
            channel, gamma * F + beta, with (gamma, beta) generated from the table.
        hidden: width of the generator's hidden layer, >= 1.
    """

    stages: tuple[int, ...] = (1, 2, 3, 4)
    hidden: int = 64

    def __post_init__(self) -> None:
        check_floats(self)
        _stages(self, "stages")
        _positive(self, "hidden")


@dataclass(frozen=True)
class DaftConfig:
    """`model.fusion.daft`: the dynamic affine feature-map transform (Pölsterl et al. 2021) at the
    input of the image encoder's last residual block.

    Args:
        bottleneck: reduction factor r of the auxiliary network: its hidden layer has
            (C + table width) / r units (at least 1), >= 1.
        scale_activation: applied to the generated scale alpha: "linear" (none), "sigmoid" or "tanh".
        scale, shift: generate and apply alpha (else 1) and beta (else 0); at least one is on.
    """

    bottleneck: int = 7
    scale_activation: Literal["linear", "sigmoid", "tanh"] = "linear"
    scale: bool = True
    shift: bool = True

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "bottleneck")
        if self.scale_activation not in ("linear", "sigmoid", "tanh"):
            raise ConfigError(f"expected linear, sigmoid or tanh, got {self.scale_activation!r}", "scale_activation")
        if not (self.scale or self.shift):
            raise ConfigError("scale and shift are both off: the transform would do nothing", "scale")


@dataclass(frozen=True)
class TabAttentionConfig:
    """`model.fusion.tab_attention`: the table's field tokens attend over the image tokens (MCAT-style).

    Args:
        stages: encoder stages (1..4, distinct, 4 among them) whose maps give the image tokens.
        layers: cross-attention blocks, >= 1.
        heads: attention heads, >= 1, dividing `model.dim`.
    """

    stages: tuple[int, ...] = (4,)
    layers: int = 1
    heads: int = 4

    def __post_init__(self) -> None:
        check_floats(self)
        _stages(self, "stages", need_last=True)
        _positive(self, "layers", "heads")


@dataclass(frozen=True)
class TensorFusionConfig:
    """`model.fusion.tensor_fusion`: the outer product of the modalities' vectors (Zadeh et al. 2017),
    low-rank (Liu et al. 2018) where the full product is too large.

    Args:
        hidden: width h of each modality's vector before the product (1 is appended to it), >= 1.
        rank: rank of the low-rank factorisation, >= 1.
        max_full: the full product (h + 1)^M over M modalities (images and the table) is used when
            it has at most this many entries, else the low-rank one; 0 = always low-rank. >= 0.
    """

    hidden: int = 16
    rank: int = 4
    max_full: int = 8192

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "hidden", "rank")
        _non_negative(self, "max_full")


@dataclass(frozen=True)
class HealnetConfig:
    """`model.fusion.healnet`: hybrid early fusion (Hemker et al. 2024), a shared latent array that
    attends to each modality in turn.

    Args:
        latents: rows of the shared latent array, >= 1.
        depth: fusion layers, >= 1.
        stages: encoder stages (1..4, distinct, 4 among them) whose maps give the image tokens.
        heads: attention heads, >= 1, dividing `model.dim`.
        share_weights: one set of fusion-layer weights for all `depth` layers.
    """

    latents: int = 16
    depth: int = 2
    stages: tuple[int, ...] = (3, 4)
    heads: int = 4
    share_weights: bool = False

    def __post_init__(self) -> None:
        check_floats(self)
        _stages(self, "stages", need_last=True)
        _positive(self, "latents", "depth", "heads")


@dataclass(frozen=True)
class FusionConfig:
    """`model.fusion`: the settings of each fusion method (read only by its `model.variant`)."""

    early_fusion: EarlyFusionConfig = field(default_factory=EarlyFusionConfig)
    film: FilmConfig = field(default_factory=FilmConfig)
    daft: DaftConfig = field(default_factory=DaftConfig)
    tab_attention: TabAttentionConfig = field(default_factory=TabAttentionConfig)
    tensor_fusion: TensorFusionConfig = field(default_factory=TensorFusionConfig)
    healnet: HealnetConfig = field(default_factory=HealnetConfig)



@dataclass(frozen=True)
class ModelConfig:
    """The network (docs/model.md).

    Args:
        variant: "cfcml" (all modalities, coarse stage), "image_only", "tabular_only" (the coarse
            stage over a subset of modalities), "late_concat" (last stage pooled, concatenated), or
            one of the established fusion methods `FUSION_VARIANTS` (cfcml/networks/fusion/):
            "early_fusion", "film", "daft", "tab_attention", "tensor_fusion", "healnet".
        encoder: "res_mamba" (the public MEN encoder: residual CNN, shared four-order Mamba layers),
            "mamba_resnet" (this platform's earlier residual CNN with bidirectional Mamba mixers) or
            "swin" (MONAI Swin); all take 2D or 3D images.
        encoder_width: res_mamba / mamba_resnet stem channels (stages double it); swin embedding width.
        encoder_blocks: res_mamba basic blocks per residual layer, >= 1 (public: 3).
        mixer_stages: stages with a Mamba mixer; res_mamba: 2..4 (its stem has none; needs
            encoder_blocks >= 2), mamba_resnet: 1..4.
        mamba_d_state, mamba_d_conv, mamba_expand: res_mamba's Mamba blocks (public: 16, 4, 2).
        scan: the selective scan: "auto" (on CUDA mamba_ssm if installed, else triton if installed;
            chunked otherwise and on CPU), "sequential", "pscan", "chunked", "mamba_ssm" (needs the
            mamba-ssm package and CUDA) or "triton" (our fused Triton kernels; needs the triton
            package and CUDA); cfcml/networks/scan.py, docs/gpu.md.
        swin_depths, swin_heads: blocks and attention heads of the four Swin layers.
        swin_patch: Swin patch size; 4 turns 224x224 photos into 56/28/14/7 token grids.
        swin_window: Swin window size.
        share_encoder: one encoder for all image modalities (the two Derm7pt photos).
        pretrained: a local state-dict file for the image encoder(s); never downloaded.
        dim: width D of every modality's tokens.
        latents_img, latents_tab: tokens each stage is compressed to, per image / the table.
        heads: attention heads of crossmodal information enhancement (divides `dim`).
        dropout: classifier dropout, in [0, 1).
        multi_granularity: off = stage 4 only (an ablation).
        cie: crossmodal information enhancement (off = an ablation).
        fusion: the fusion methods' own settings (`FusionConfig`), read by the matching variant only.
    """

    variant: Literal["cfcml", "image_only", "tabular_only", "late_concat", "early_fusion", "film", "daft",
                     "tab_attention", "tensor_fusion", "healnet"] = "cfcml"
    encoder: Literal["res_mamba", "mamba_resnet", "swin"] = "res_mamba"
    encoder_width: int = 16
    encoder_blocks: int = 3
    mixer_stages: tuple[int, ...] = (2, 3, 4)
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    scan: Literal["auto", "sequential", "pscan", "chunked", "mamba_ssm", "triton"] = "auto"
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_patch: int = 2
    swin_window: int = 7
    share_encoder: bool = False
    pretrained: str | None = None
    dim: int = 128
    latents_img: int = 48
    latents_tab: int = 16
    heads: int = 4
    dropout: float = 0.5
    multi_granularity: bool = True
    cie: bool = True
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "encoder_width", "encoder_blocks", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                  "swin_patch", "swin_window", "dim", "latents_img", "latents_tab", "heads")
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by {self.heads} heads", "heads")
        if not set(self.mixer_stages) <= {1, 2, 3, 4}:
            raise ConfigError(f"stages are numbered 1..4, got {self.mixer_stages}", "mixer_stages")
        if self.encoder == "res_mamba":
            if 1 in self.mixer_stages:
                raise ConfigError("res_mamba's stem (stage 1) has no Mamba layer; use stages 2..4", "mixer_stages")
            if self.mixer_stages and self.encoder_blocks < 2:
                raise ConfigError("res_mamba's Mamba layer acts in a layer's blocks 2.., so mixer_stages "
                                  f"{list(self.mixer_stages)} need at least 2 blocks", "encoder_blocks")
        if self.scan not in SCANS:
            raise ConfigError(f"expected one of {list(SCANS)}, got {self.scan!r}", "scan")
        if self.scan == "mamba_ssm" and importlib.util.find_spec("mamba_ssm") is None:
            raise ConfigError("the mamba_ssm scan needs the mamba-ssm package (pip install mamba-ssm, on a CUDA "
                              "machine); use auto, chunked or pscan", "scan")
        if self.scan == "triton" and importlib.util.find_spec("triton") is None:
            raise ConfigError("the triton scan needs the triton package (pip install triton; CUDA builds of torch "
                              "ship it); use auto, chunked or pscan", "scan")
        if len(self.swin_depths) != 4 or len(self.swin_heads) != 4:
            raise ConfigError("need 4 entries each", "swin_depths")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.dropout!r}", "dropout")
        if min(self.swin_heads) < 1 or min(self.swin_depths) < 1:
            raise ConfigError("heads and depths must be >= 1", "swin_heads")
        for method in ("tab_attention", "healnet"):
            heads = getattr(self.fusion, method).heads
            if self.dim % heads:
                raise ConfigError(f"dim {self.dim} is not divisible by {heads} heads", f"fusion.{method}.heads")
        if self.encoder == "swin":
            for i, h in enumerate(self.swin_heads):  # stage i has encoder_width * 2**i channels
                if (self.encoder_width * 2**i) % h:
                    raise ConfigError(f"stage {i + 1} has {self.encoder_width * 2**i} channels, "
                                      f"not divisible by {h} heads", "swin_heads")


@dataclass(frozen=True)
class LossConfig:
    """The training loss: w_cls * CE + w_sam * L_sam + w_up * L_up + w_cp * L_cp (docs/model.md).

    Args:
        fine: hierarchical relationship mining; off = cross-entropy only (an ablation).
        w_cls, w_sam, w_up, w_cp: term weights, >= 0 (public MEN values 1 / 0.06 / 0.04 / 0.24).
        tau_sam, tau_up, tau_cp: temperatures, > 0 (public value 0.07).
        momentum: prototype EMA in [0, 1); 0 is the paper's per-batch prototypes.
        class_weights: "none" (plain cross-entropy, the paper's) or "balanced" (each class's
            cross-entropy weighted by N / (C * N_c) from the training fold's counts, so a minority
            class counts as much as the majority; docs/evaluation.md, "Decisions").
    """

    fine: bool = True
    w_cls: float = 1.0
    w_sam: float = 0.06
    w_up: float = 0.04
    w_cp: float = 0.24
    tau_sam: float = 0.07
    tau_up: float = 0.07
    tau_cp: float = 0.07
    momentum: float = 0.0
    class_weights: Literal["none", "balanced"] = "none"

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "tau_sam", "tau_up", "tau_cp")
        _non_negative(self, "w_cls", "w_sam", "w_up", "w_cp")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.momentum!r}", "momentum")


@dataclass(frozen=True)
class OptimConfig:
    """Adam with linear warm-up, then step decay.

    Args:
        lr: learning rate, > 0.
        encoder_lr_mult: the image encoder's learning rate is lr times this (Derm7pt: 0.1).
        weight_decay: >= 0.
        warmup_epochs: linear warm-up length, >= 0.
        step_size, gamma: after warm-up, lr *= gamma every step_size epochs; gamma in (0, 1].
    """

    lr: float = 5e-4
    encoder_lr_mult: float = 1.0
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    step_size: int = 5
    gamma: float = 0.8

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "lr", "step_size")
        _non_negative(self, "encoder_lr_mult", "weight_decay", "warmup_epochs")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.gamma!r}", "gamma")


@dataclass(frozen=True)
class TrainConfig:
    """How one configuration is trained (per trial, and for the final model).

    Args:
        epochs: the most epochs a trial trains (a search's ASHA max_t).
        batch_size: samples per optimiser step, over all data-parallel workers.
        folds: cross-validation folds, >= 2 (the prepared dataset must have as many).
        balanced_sampler: draw class-balanced batches instead of shuffling.
        loader_workers: torch DataLoader worker processes per Ray Train worker.
        workers: Ray Train (DDP) workers per trial.
        cpus_per_worker, gpus_per_worker: Ray resources of each worker.
        amp: bfloat16 autocast, used only on GPU. Off by default: on an H100 it bought no speed for
            MEN or Derm7pt at batch 8 and lowers memory (the timings: docs/gpu.md, "Why `amp` is off
            by default"). The scan and the loss run in float32 either way.
        tf32: on GPU, TF32 tensor cores for float32 matrix products (cuDNN convolutions use them
            by default already); about 10 bits of mantissa, as cuDNN's convolutions.
        channels_last: on GPU, weights and images in channels-last memory order.
        compile: on GPU, torch.compile the training network (minutes of compilation per model, see
            docs/gpu.md; pays only for long runs).
        cuda_graphs: on one GPU, capture the whole training step (forward, CFCMLLoss, backward,
            Adam, prototype bank) as one CUDA graph and replay it: one launch a step instead of
            thousands. Batches of another shape (a ragged last batch) and data-parallel runs train
            eagerly; a failed capture warns once and trains eagerly. Changes no number on CPU,
            where it does nothing. Exclusive with `compile` (docs/gpu.md).
        prefetch_factor: batches each loader worker keeps ready (used when loader_workers > 0).
        max_failures: restarts of a trial's Ray Train workers after a crash (a preempted node, an
            out-of-memory kill), each from the last checkpoint; 0 fails the trial at once.
        stall_timeout_s: seconds a running trial may go without reporting an epoch, on top of the
            longest silence (start-up plus first epoch, or one epoch) seen from any trial of the
            run so far, before `tuning.runtime.watchdog.TrialWatchdog` names what it waits for and fails it
            (`cfcml.failure_reason`); the search goes on without it. Positive; default 600.
        checkpoint_every: a run writes a checkpoint every this many epochs, plus at each epoch
            that becomes its selected epoch and at its last epoch (`tuning.hpo.trainer.CheckpointPolicy`);
            1 = every epoch. A crash retrains at most this many epochs minus one. Positive.
        image_size: overrides the dataset's preprocessed image size (tiny demos), 2 or 3 sizes.
        seed: seeds weights, batch order and augmentation (not the folds: see the fold seed).
        selection_metric: the validation metric that selects trials and epochs (ASHA, the best
            trial, the final model's epoch count), one of `cfcml.evaluation.metrics.metric_names` of the task,
            e.g. macro_auc, balanced_accuracy, auc; None = the dataset's `selection_metric`. AUCs
            judge rankings; balanced accuracy judges the argmax decisions (docs/evaluation.md).
        modality_dropout: per training sample, the probability of withholding each image modality
            (a zero image; at least one is kept), in [0, 1). 0 (the published recipe) = off. A
            model trained with it > 0 accepts a missing modality at prediction time
            (cfcml/evaluation/missing_inputs.py, docs/evaluation.md).
        field_dropout: per training sample, the probability of replacing each clinical field by its
            missing token, in [0, 1). 0 (the published recipe) = off.
    """

    epochs: int = 100
    batch_size: int = 8
    folds: int = 5
    balanced_sampler: bool = False
    loader_workers: int = 0
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    amp: bool = False
    tf32: bool = True
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    prefetch_factor: int = 2
    max_failures: int = 2
    stall_timeout_s: float = 600.0
    checkpoint_every: int = 5
    image_size: tuple[int, ...] | None = None
    seed: int = 0
    selection_metric: str | None = None
    modality_dropout: float = 0.0
    field_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_floats(self)
        _positive(self, "epochs", "batch_size", "workers", "prefetch_factor", "checkpoint_every", "stall_timeout_s")
        for name in ("modality_dropout", "field_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"must be in [0, 1), got {getattr(self, name)!r}", name)
        _non_negative(self, "loader_workers", "cpus_per_worker", "gpus_per_worker", "max_failures")
        if self.folds < 2:
            raise ConfigError(f"cross-validation needs at least 2 folds, got {self.folds}", "folds")
        if self.image_size is not None and (len(self.image_size) not in (2, 3) or min(self.image_size) < 1):
            raise ConfigError(f"expected 2 or 3 positive sizes, got {list(self.image_size)}", "image_size")
        if self.cuda_graphs and self.compile:
            raise ConfigError("cannot be combined with train.compile: choose one way to cut launches "
                              "(torch.compile's own graphs are its mode='reduce-overhead')", "cuda_graphs")


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A new config with `overrides` deep-merged (dotted keys like "loss.tau_sam" allowed)."""
        return from_dict(ExperimentConfig, deep_merge(self.to_dict(), overrides), "config")

    def value(self, dotted: str) -> Any:
        """The value at a dotted key, e.g. cfg.value("loss.tau_sam")."""
        node: Any = self
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                raise ConfigError("unknown key", dotted)
            node = getattr(node, part)
        return node


def _check_value(tp: Any, value: Any, path: str, allow_inf: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: a value is required")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, path, allow_inf)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_check_value(item, v, f"{path}[{i}]", allow_inf) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(cast("type[DataclassInstance]", tp), value, path)  # a dataclass type, never an instance
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 5e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return _finite(float(value), path, allow_inf)  # nan, "nan", .inf, "-inf", 1e999
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _key(path: str, name: str) -> str:
    return f"{path} {name}" if path.endswith(":") else f"{path}.{name}"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, evaluated once per class: the annotations are strings (`from
    __future__ import annotations`), and compiling them again on every `replace` made a config check
    cost about 3 ms per section (a comparison's plan of its variants' search spaces: 12 s)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type[_Dataclass], data: Any, path: str = "config") -> _Dataclass:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values (a float
    must be finite: nan never, +-inf only in a field with `ALLOWS_INF` metadata); ConfigError
    naming `path` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_key(path, unknown[0])}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_value(hints[name], data[name], _key(path, name), f.metadata.get(ALLOWS_INF, False))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_key(path, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a section's own check: name the key from the top
        if exc.key is None:
            raise
        raise ConfigError(exc.detail, _key(path, exc.key)) from None


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge `overrides` into a copy of `base`; a dotted key "a.b" addresses base["a"]["b"]."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return out


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (how configs are logged as parameters)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice (PyYAML would keep the last value without a word)."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        where = f"twice on line {first_line}" if first_line == second_line else \
            f"at lines {first_line} and {second_line}"
        super().__init__(f"duplicate key {key!r} {where}")
        self.key, self.lines = key, (first_line, second_line)


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping naming a key twice (DuplicateKeyError with both
    line numbers), at any depth and in flow style (`{low: 1, low: 2}`) too. Keys brought in by a
    merge key (`<<: *base`) may be overridden: that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text as `yaml.safe_load` does, but a mapping with a duplicate key raises
    `DuplicateKeyError` (a `yaml.YAMLError`). Every YAML the platform reads goes through it: the
    experiment, dataset and search files (`read_yaml`) and `--set` values."""
    return yaml.load(text, Loader=StrictLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping. ConfigError naming the file when it is missing, is not
    YAML, names a key twice in one mapping ("duplicate key 'num_samples' at lines 2 and 5: give
    it once") or holds no mapping at the top level."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}: give it once") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def read_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config YAML; `extends: NAME` (a file of the same folder, without .yaml) is read first and
    this file's keys are deep-merged over it (a list, such as `fields:`, replaces the base's).
    The identity keys `name` and `dataset` are not inherited: a file is named after itself."""
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    parent = path.parent / f"{base}.yaml"
    if not isinstance(base, str) or not parent.is_file():
        raise ConfigError(f"{path}: extends: no config {base!r} in {path.parent}")
    if parent.resolve() in _seen:
        raise ConfigError(f"{path}: extends: a cycle through {parent}")
    inherited = {k: v for k, v in read_config(parent, (*_seen, path.resolve())).items() if k not in ("name", "dataset")}
    return _merge_files(inherited, data)


def _merge_files(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings merged key by key, keys taken literally (a search file's `overrides:` holds
    dotted keys such as "model.dim" that must stay as written)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge_files(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def known_names(kind: str) -> str:
    """The config names available under conf/<kind>/, for error messages."""
    return ", ".join(sorted(p.stem for p in (CONF_DIR / kind).glob("*.yaml"))) or "none"


def load_experiment(dataset: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load conf/experiments/<dataset>.yaml (or a path) and apply overrides."""
    path = Path(dataset)
    if not path.suffix:
        path = CONF_DIR / "experiments" / f"{dataset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown dataset {dataset!r}: no {path} (known: {known_names('experiments')})")
    data = read_config(path)
    data.setdefault("dataset", path.stem)
    return from_dict(ExperimentConfig, deep_merge(data, overrides or {}), f"{path}:")
