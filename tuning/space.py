"""Search configs (`conf/search/<name>.yaml`): the Tune search space, budget and overrides.

A search config looks like

    num_samples: 20            # trials
    max_epochs: 60             # per trial (ASHA's max_t)
    grace_period: 5            # epochs before ASHA may stop a trial
    reduction_factor: 2
    folds: 5
    overrides: {}              # experiment config overrides (dotted keys), e.g. a tiny model
    dataset_overrides: {}      # per dataset name, applied after `overrides` (e.g. image sizes)
    space:                     # dotted experiment keys -> distribution
      loss.tau_sam: {dist: loguniform, low: 0.02, high: 0.5}

The experiment's own values for the searched keys (the public code's settings) are the first
point Optuna evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfcml.config import CONF_DIR, ConfigError, ExperimentConfig, known_names, read_yaml

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Param:
    key: str  # dotted experiment key, also the Tune parameter name
    dist: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def tune_domain(self) -> Any:
        from ray import tune

        if self.dist == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.dist == "uniform":
            return tune.uniform(self.low, self.high)
        if self.dist == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class SearchConfig:
    name: str
    num_samples: int = 20
    max_epochs: int | None = None  # None: the experiment's train.epochs
    grace_period: int = 5
    reduction_factor: int = 2
    folds: int | None = None  # None: the experiment's train.folds
    overrides: dict[str, Any] = field(default_factory=dict)
    space: tuple[Param, ...] = ()


def _param(key: str, raw: Any, where: str, base: ExperimentConfig) -> Param:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{dist: loguniform, low: .., high: ..}}")
    unknown = set(raw) - {"dist", "low", "high", "values"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    dist = raw.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}.dist: expected one of {list(DISTRIBUTIONS)}, got {dist!r}")
    try:  # the key must name a real experiment field with a compatible value
        base.replace({key: raw["values"][0] if dist == "choice" else raw.get("low")})
    except (ConfigError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if dist == "choice":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values: a non-empty list is required for dist: choice")
        return Param(key, dist, values=tuple(values))
    try:
        low, high = float(raw["low"]), float(raw["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: numeric low and high are required for dist: {dist}") from None
    if not low < high or (dist == "loguniform" and low <= 0):
        raise ConfigError(f"{where}: need 0 < low < high for loguniform, low < high otherwise")
    return Param(key, dist, low, high)


def load_search(name_or_path: str, base: ExperimentConfig) -> SearchConfig:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_DIR / "search" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown search {name_or_path!r}: no {path} (known: {known_names('search')})")
    raw = read_yaml(path)
    where = f"{path}:"
    known = {"num_samples", "max_epochs", "grace_period", "reduction_factor", "folds", "overrides",
             "dataset_overrides", "space"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where} {sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(known))})")
    for key in ("num_samples", "max_epochs", "grace_period", "reduction_factor", "folds"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where} {key}: expected a positive integer, got {value!r}")
    overrides = raw.get("overrides") or {}
    per_dataset = raw.get("dataset_overrides") or {}
    if not isinstance(overrides, dict) or not isinstance(per_dataset, dict):
        raise ConfigError(f"{where} overrides/dataset_overrides: expected a mapping")
    mine = per_dataset.get(base.dataset) or {}
    if not isinstance(mine, dict):
        raise ConfigError(f"{where} dataset_overrides.{base.dataset}: expected a mapping")
    overrides = {**overrides, **mine}
    try:
        with_overrides = base.replace(overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where} overrides: {exc}") from None
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise ConfigError(f"{where} space: expected a mapping of dotted keys to distributions")
    space = tuple(_param(k, v, f"{where} space.{k}", with_overrides) for k, v in space_raw.items())
    return SearchConfig(
        name=path.stem,
        num_samples=raw.get("num_samples", 20),
        max_epochs=raw.get("max_epochs"),
        grace_period=raw.get("grace_period", 5),
        reduction_factor=raw.get("reduction_factor", 2),
        folds=raw.get("folds"),
        overrides=overrides,
        space=space,
    )


def initial_point(search: SearchConfig, cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment's own values of the searched keys (Optuna evaluates them first)."""
    flat = cfg.to_dict()
    point = {}
    for p in search.space:
        node: Any = flat
        for part in p.key.split("."):
            node = node[part]
        point[p.key] = node
    return point
