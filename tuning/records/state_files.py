"""The state files a resumed search (or final step) reads, checked before Ray reads them.

A disk that filled up, or a machine that went down, while a state file was being written leaves it
cut short; Ray then fails on it at every resume (Ray Train: `CheckpointManagerInitializationError`,
which Tune reports as an interruption, so `--resume` looped). `check_resume_state` parses each one
first and

- moves a damaged Ray Train `checkpoint_manager_snapshot.json` (one per trial's Ray Train run, and
  the final model's) aside, to `<name>.damaged-<time>`, and says so on the console. Choice: the
  trial then continues from its newest intact checkpoint folder, which the training loop finds by
  itself when Ray Train hands it none (`tuning.hpo.trainer`); the snapshot only lists those folders.
  Nothing is deleted: the damaged file stays next to the new one for inspection;
- moves Tune's state (`tuner.pkl` and the session's state files) into `damaged-<time>/` in the
  search's folder when its experiment state is damaged (Tune writes it in place, so a full disk
  can cut it short): nothing can rebuild it, so the search restarts its trials as a new Tune
  experiment of the same name, continuing the same MLflow parent run; the trials that had finished
  are trained again and their runs stay as they ended. Said on the console;
- refuses (ConfigError, one line naming the file) when the damaged file is the search's own state
  file (it names the MLflow parent run): restore it, or start the search under another --name.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from cfcml.config import ConfigError

TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants
TUNE_STATE_GLOBS = ("experiment_state-*.json", "basic-variant-state-*.json")
TUNE_SESSION_GLOBS = ("tuner.pkl", "experiment_state-*", "basic-variant-state-*", "search_gen_state-*",
                      "searcher-state-*")
# Tune's trial ids: 8 hex digits (a searcher's trials), or 5 hex digits and a 5-digit counter
TRIAL_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{5}_\d{5}|[0-9a-f]{8})(?![0-9a-f])")


def damaged_json(path: Path) -> str | None:
    """Why `path` is not a readable JSON file (None if it is)."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def trial_ids(search_dir: Path) -> list[str]:
    """What may be the Tune trial ids of a search: the id-shaped parts of its trial folders' names
    (`run_trial_<id>_<n>_<values>_<date>`); callers keep those that name a Ray Train run."""
    ids: set[str] = set()
    for path in Path(search_dir).iterdir() if Path(search_dir).is_dir() else []:
        if path.is_dir():
            ids.update(TRIAL_ID.findall(path.name))
    return sorted(ids)


def set_aside(path: Path, reason: str, log=print) -> Path:
    """Rename a damaged file to `<name>.damaged-<time>` and say so; returns the new path."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    log(f"warning: {path} is damaged ({reason}); moved aside to {target.name}: the run continues from its "
        f"newest intact checkpoint")
    return target


def repair_train_snapshots(run_dirs: list[Path], log=print) -> list[Path]:
    """Move the damaged Ray Train snapshots of the Ray Train runs `run_dirs` aside; returns the
    damaged files' original paths."""
    repaired = []
    for run_dir in run_dirs:
        snapshot = Path(run_dir) / TRAIN_SNAPSHOT
        if snapshot.is_file():
            reason = damaged_json(snapshot)
            if reason:
                set_aside(snapshot, reason, log)
                repaired.append(snapshot)
    return repaired


def check_resume_state(search_dir: Path, train_dir: Path, state_file: str, log=print) -> list[Path]:
    """Before a search resumes: refuse a damaged search state file or Tune experiment state
    (ConfigError naming it), move damaged Ray Train snapshots of this search's trials aside
    (`repair_train_snapshots`). Returns the snapshots moved aside."""
    search_dir = Path(search_dir)
    own = search_dir / state_file
    reason = damaged_json(own) if own.exists() else None
    if reason:
        raise ConfigError(f"--resume: {own} is damaged ({reason}); the search cannot continue from it. "
                          f"Restore that file, or start the search again under another --name")
    for path in [p for g in TUNE_STATE_GLOBS for p in sorted(search_dir.glob(g))]:
        reason = damaged_json(path)
        if reason:
            aside = search_dir / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(exist_ok=True)
            for g in TUNE_SESSION_GLOBS:
                for f in search_dir.glob(g):
                    f.rename(aside / f.name)
            log(f"warning: {path} is damaged ({reason}); Tune's state moved aside to {aside.name}/: the search "
                f"restarts its trials (those that had finished are trained again)")
            break
    runs = [Path(train_dir) / f"trial_{tid}" for tid in trial_ids(search_dir)]
    return repair_train_snapshots([r for r in runs if r.is_dir()], log)
