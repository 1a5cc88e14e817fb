"""Typed, validated configuration loaded from YAML.

An experiment is `conf/experiments/<dataset>.yaml` (model, loss, optimiser and training sections),
optionally deep-merged with overrides (a search config's `overrides:` section, CLI flags). Every key
is checked against the dataclasses below at load time, so a typo or a bad value fails before any
work starts, with the key's dotted path in the message.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration key is missing, unknown or has a bad value; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    variant: Literal["cfcml", "image_only", "tabular_only", "late_concat"] = "cfcml"
    encoder: Literal["mamba_resnet", "swin"] = "mamba_resnet"
    encoder_width: int = 16  # mamba_resnet: stem channels (stages double it); swin: embed dim
    mixer_stages: tuple[int, ...] = (1, 2, 3, 4)  # mamba_resnet stages with a global Mamba mixer
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_patch: int = 2  # 4 for 224x224 photos gives the 56/28/14/7 token grids
    swin_window: int = 7
    share_encoder: bool = False  # one encoder for all image modalities (Derm7pt photos)
    pretrained: str | None = None  # local state-dict file for the image encoder(s); never downloaded
    dim: int = 128
    latents_img: int = 48
    latents_tab: int = 16
    heads: int = 4
    dropout: float = 0.5
    multi_granularity: bool = True  # off: stage 4 only
    cie: bool = True  # crossmodal information enhancement


@dataclass(frozen=True)
class LossConfig:
    fine: bool = True  # hierarchical relationship mining (off: cross-entropy only)
    w_cls: float = 1.0
    w_sam: float = 0.06
    w_up: float = 0.04
    w_cp: float = 0.24
    tau_sam: float = 0.07
    tau_up: float = 0.07
    tau_cp: float = 0.07
    momentum: float = 0.0  # prototype EMA; 0 is the paper's per-batch prototypes


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    encoder_lr_mult: float = 1.0  # Derm7pt fine-tunes its (pretrained) encoder at 0.1x
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    step_size: int = 5
    gamma: float = 0.8


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 8
    folds: int = 5
    balanced_sampler: bool = False
    loader_workers: int = 0  # torch DataLoader worker processes per Ray Train worker
    workers: int = 1  # Ray Train (DDP) workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    amp: bool = True  # mixed precision, used only on GPU
    image_size: tuple[int, ...] | None = None  # overrides the dataset's image size (tiny demos)
    seed: int = 0


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


def _check_value(tp: Any, value: Any, path: str) -> Any:
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
                return _check_value(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_check_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _key(path: str, name: str) -> str:
    return f"{path} {name}" if path.endswith(":") else f"{path}.{name}"


def from_dict(cls: type, data: Any, path: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_key(path, unknown[0])}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_value(hints[name], data[name], _key(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_key(path, name)}: required key is missing")
    obj = cls(**kwargs)
    _validate_ranges(obj, path)
    return obj


def _validate_ranges(obj: Any, path: str) -> None:
    positive = {
        "dim", "latents_img", "latents_tab", "heads", "encoder_width", "epochs", "batch_size",
        "workers", "swin_patch", "swin_window", "tau_sam", "tau_up", "tau_cp", "lr", "step_size",
    }
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in positive and isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"{_key(path, f.name)}: must be > 0, got {value!r}")
    non_negative = {"w_cls", "w_sam", "w_up", "w_cp", "weight_decay", "encoder_lr_mult", "warmup_epochs",
                    "loader_workers", "cpus_per_worker", "gpus_per_worker"}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in non_negative and isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{_key(path, f.name)}: must be >= 0, got {value!r}")
    if isinstance(obj, LossConfig) and not 0.0 <= obj.momentum < 1.0:
        raise ConfigError(f"{_key(path, 'momentum')}: must be in [0, 1), got {obj.momentum!r}")
    if isinstance(obj, OptimConfig) and not 0.0 < obj.gamma <= 1.0:
        raise ConfigError(f"{_key(path, 'gamma')}: must be in (0, 1], got {obj.gamma!r}")
    if isinstance(obj, TrainConfig) and obj.image_size is not None and (
            len(obj.image_size) not in (2, 3) or min(obj.image_size) < 1):
        raise ConfigError(f"{_key(path, 'image_size')}: expected 2 or 3 positive sizes, got {list(obj.image_size)}")
    if isinstance(obj, TrainConfig) and obj.folds < 2:
        raise ConfigError(f"{_key(path, 'folds')}: cross-validation needs at least 2 folds, got {obj.folds}")
    if isinstance(obj, ModelConfig):
        if obj.dim % obj.heads:
            raise ConfigError(f"{_key(path, 'heads')}: dim {obj.dim} is not divisible by {obj.heads} heads")
        if not set(obj.mixer_stages) <= {1, 2, 3, 4}:
            raise ConfigError(f"{_key(path, 'mixer_stages')}: stages are numbered 1..4, got {obj.mixer_stages}")
        if len(obj.swin_depths) != 4 or len(obj.swin_heads) != 4:
            raise ConfigError(f"{_key(path, 'swin_depths')}: need 4 entries each")
        if not 0.0 <= obj.dropout < 1.0:
            raise ConfigError(f"{_key(path, 'dropout')}: must be in [0, 1), got {obj.dropout!r}")
        if min(obj.swin_heads) < 1 or min(obj.swin_depths) < 1:
            raise ConfigError(f"{_key(path, 'swin_heads')}: heads and depths must be >= 1")
        if obj.encoder == "swin":
            for i, h in enumerate(obj.swin_heads):  # stage i has encoder_width * 2**i channels
                if (obj.encoder_width * 2**i) % h:
                    raise ConfigError(f"{_key(path, 'swin_heads')}: stage {i + 1} has {obj.encoder_width * 2**i} "
                                      f"channels, not divisible by {h} heads")


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


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


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
    data = read_yaml(path)
    data.setdefault("dataset", path.stem)
    return from_dict(ExperimentConfig, deep_merge(data, overrides or {}), f"{path}:")
