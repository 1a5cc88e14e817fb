"""The tiny MEN-like cohort and model that the training-loop tests share: 32x32x8 volumes, a
2-fold split, a model of a few thousand parameters (`TINY_MODEL`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cfcml.config import ExperimentConfig, load_experiment
from cfcml.data.manifest import PreparedDataset
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men

SIZE = (32, 32, 8)
TINY_MODEL = {"encoder_width": 4, "encoder_blocks": 2, "mixer_stages": [4], "dim": 32, "latents_img": 4,
              "latents_tab": 4}


def prepare_tiny_men(folder: Path, patients: int, seed: int) -> PreparedDataset:
    """A synthetic MEN cohort of `patients` written under `folder` and prepared with 2 folds."""
    root = make_men(folder / "men", patients=patients, seed=seed, size=SIZE)
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=SIZE)


def tiny_experiment(batch_size: int = 6, **sections: dict[str, Any]) -> ExperimentConfig:
    """The MEN experiment with `TINY_MODEL`, 2 folds and `batch_size`; `sections` (e.g.
    `loss={"momentum": 0.5}`, `train={...}`) are merged over it key by key."""
    values: dict[str, dict[str, Any]] = {"model": dict(TINY_MODEL), "train": {"batch_size": batch_size, "folds": 2}}
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    return load_experiment("men").replace(values)
