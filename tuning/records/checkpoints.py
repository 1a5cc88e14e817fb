"""Trial checkpoints: the files of one epoch's checkpoint, written atomically, and their one reader.

A checkpoint folder holds

    state.pt              `CrossValidation.state_dict()`: every fold's model, optimiser, scheduler,
                          prototype bank and tabular normaliser, plus the epoch
    metrics.json          that epoch's metrics
    oof_predictions.csv   that epoch's out-of-fold predictions (CV trials)
    test_predictions.csv  the one test evaluation (final model, last epoch only)
    checkpoint.json       written last: the epoch and the size and SHA-256 of every other file

Each file is written to a temporary name and renamed, and `checkpoint.json` comes last, so a folder
without it (or with a file that does not match it) is an interrupted or damaged write:
`CheckpointReader` refuses it with a `CheckpointError` naming the file, and `restorable` walks
back to the newest intact checkpoint of a run. No other module knows these names or the layout of
`state.pt`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
OOF_FILE = "oof_predictions.csv"
TEST_FILE = "test_predictions.csv"
INDEX_FILE = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or damaged; the message names the file."""


@dataclass
class FoldWeights:
    """What inference needs of one fold: the network's state dict and its normaliser statistics."""

    model: dict[str, Any]
    normalizer: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_checkpoint(directory: str | Path, state: dict[str, Any], metrics: dict[str, Any],
                     oof: pd.DataFrame | None = None, test: pd.DataFrame | None = None) -> Path:
    """Write one epoch's checkpoint files into `directory`, the index last."""
    import torch

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic(d / STATE_FILE, lambda p: torch.save(state, p))
    _atomic(d / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=1), encoding="utf-8"))
    if oof is not None and len(oof):
        _atomic(d / OOF_FILE, lambda p: oof.to_csv(p, index=False))
    if test is not None:
        _atomic(d / TEST_FILE, lambda p: test.to_csv(p, index=False))
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(d.iterdir()) if f.name != INDEX_FILE and f.is_file() and not f.name.endswith(".tmp")}
    index = {"epoch": int(state["epoch"]), "files": files}
    _atomic(d / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=1), encoding="utf-8"))
    return d


class CheckpointReader:
    """Reads a checkpoint folder written by `write_checkpoint`, after checking it is whole."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.dir = Path(directory)
        self._index: dict[str, Any] | None = None
        if verify:
            self.verify()

    def verify(self) -> None:
        index_path = self.dir / INDEX_FILE
        if not index_path.is_file():
            raise CheckpointError(f"{index_path}: missing; the checkpoint at {self.dir} was not completely written")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            files = index["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable ({exc})") from None
        for name, expected in files.items():
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from the checkpoint")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(f"{path}: truncated or changed ({size} bytes, {expected['bytes']} written)")
            if _sha256(path) != expected["sha256"]:
                raise CheckpointError(f"{path}: corrupt (its SHA-256 does not match the one written)")
        self._index = index

    @property
    def epoch(self) -> int:
        if self._index is None:
            self.verify()
        assert self._index is not None
        return int(self._index["epoch"])

    def state(self, map_location: MAP_LOCATION = "cpu") -> dict[str, Any]:
        """The full training state (`CrossValidation.load_state_dict` takes it). Plain tensors and
        numbers only, so it loads with `weights_only=True` (no pickled code runs)."""
        import torch

        path = self.dir / STATE_FILE
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # a damaged file that still matched its index is not expected
            raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from None

    def fold_weights(self) -> list[FoldWeights]:
        """Per fold (one for a final model): the network weights and normaliser statistics."""
        return [FoldWeights(f["model"], f["normalizer"]) for f in self.state()["folds"]]

    def metrics(self) -> dict[str, Any]:
        path = self.dir / METRICS_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def oof(self) -> pd.DataFrame | None:
        path = self.dir / OOF_FILE
        return pd.read_csv(path) if path.is_file() else None

    def test_predictions(self) -> pd.DataFrame:
        path = self.dir / TEST_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no test predictions in this checkpoint (not a final model's last epoch)")
        return pd.read_csv(path)

    def file(self, name: str) -> Path:
        """Path of one of the files above (to log it as an artifact)."""
        return self.dir / name


@contextlib.contextmanager
def open_checkpoint(location: str | Path) -> Iterator[CheckpointReader]:
    """A reader over a checkpoint at a local path or a storage URI (downloaded for the block)."""
    from ray.train import Checkpoint

    with Checkpoint(str(location)).as_directory() as d:
        yield CheckpointReader(d)


def restorable(latest: str | Path, log: Callable[[str], object] = print) -> CheckpointReader | None:
    """The newest intact checkpoint of the run that wrote `latest`, starting with `latest` itself.

    A damaged checkpoint is reported through `log` and skipped; its older siblings (Ray Train
    keeps the last few as `checkpoint_*` folders of the run) are tried newest first.
    """
    latest = Path(latest)
    # names are checkpoint_<date and time>: older ones sort before `latest`
    siblings = sorted((p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name < latest.name),
                      key=lambda p: p.name, reverse=True)
    for candidate in [latest, *siblings]:
        try:
            return CheckpointReader(candidate)
        except CheckpointError as exc:
            log(f"checkpoint skipped: {exc}")
    return None
