"""The prepared dataset a search or comparison trains on: a prepared folder as it is, or a raw
dataset folder validated and prepared first (its cache reused when unchanged)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cfcml.config import ConfigError
from cfcml.data.manifest import MANIFEST_FILE, PreparedDataset


def load_or_prepare(dataset: str, root: Path, *, folds: int, fold_seed: int | None,
                    image_size: tuple[int, ...] | None, log: Callable[[str], None] = print) -> PreparedDataset:
    """`root` holding manifest.parquet is used as prepared; it must have `folds` folds and, when
    `fold_seed` is given, that fold seed. Otherwise `root` is a raw dataset: it is validated and
    prepared into `<root>/prepared` with `folds` folds drawn with `fold_seed` (default 0).

    Raises ConfigError on a mismatch, a missing folder or an unwritable output folder,
    DatasetValidationError (the whole
    report) on bad data; both before anything expensive starts.
    """
    from cfcml.data.prepare import prepare_dataset

    root = Path(root)
    if (root / MANIFEST_FILE).is_file():
        prepared = PreparedDataset.load(root)
        if prepared.folds != folds:
            raise ConfigError(f"train.folds: {folds} folds wanted but {root} was prepared with {prepared.folds}; "
                              f"prepare it again with --folds {folds}, or pass --folds {prepared.folds}")
        if fold_seed is not None and prepared.fold_seed != fold_seed:
            raise ConfigError(f"--fold-seed: {root} was prepared with fold seed {prepared.fold_seed}, not "
                              f"{fold_seed}; prepare it again with --fold-seed {fold_seed}")
        return prepared
    if not root.is_dir():
        raise ConfigError(f"--data-root: no dataset at {root}. Generate one with "
                          f"`python pipelines/make_synthetic.py --dataset {dataset} --data-root {root}` "
                          f"or point --data-root at your data")
    from cfcml.outputs import OutputPathError

    try:
        return prepare_dataset(dataset, root, folds=folds, fold_seed=0 if fold_seed is None else fold_seed,
                               image_size=image_size, progress=True, log=log)
    except OutputPathError as exc:  # e.g. <root>/prepared is a file: one line, before any image is read
        raise ConfigError(f"--data-root: {exc}") from None
