"""Every MLflow run a command starts ends: FINISHED, FAILED or KILLED, with the reason as a tag.

`owned_run(client, run_id)` is the one owner of a run's end for the block it wraps (a search's
parent run, a final or fold-ensemble run, a comparison run). However the block ends:

- normally: the block ends the run itself (FINISHED, or FAILED when it found nothing); a run the
  block left RUNNING is ended FINISHED;
- Ctrl-C (`KeyboardInterrupt`): KILLED, `cfcml.end_reason` "interrupted (Ctrl-C)";
- any other exception (an error in the driver, an exception raised inside a Tune callback such as
  the tracker's, a full disk): FAILED, `cfcml.end_reason` naming the exception.

With `children=True` the run's child runs (a search's trials, a comparison's variants) that are
still RUNNING end the same way. A run the block ended already (a search interrupted by Ctrl-C is
KILLED by the driver before it raises) keeps its status. Ending a run is best effort: when the
store itself is what failed (a full disk), the original error is raised, not the store's.
`reopen_run` sets a run that continues (--resume) RUNNING again without its old reason.

Full disks: `reserve_space` holds 4 MB that a disk-full error releases first, so that MLflow's
store on that disk can record the runs' end; `DiskGuard` (a Tune callback) stops a search while
one more checkpoint still fits; `is_disk_full` and `disk_full_message` recognise and say it.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

END_REASON_TAG = "cfcml.end_reason"
RESERVE_NAME = ".cfcml-disk-reserve"
RESERVE_BYTES = 4 * 2**20  # what MLflow's SQLite store needs to record the end of the runs (journal, pages)
_reserves: list[Path] = []
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None) if isinstance(getattr(e, "cause", None),
                                                                                      BaseException) else None]


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk or an exhausted quota:
    an OSError with errno ENOSPC/EDQUOT, SQLite's "database or disk is full" (through SQLAlchemy
    and MLflow), or the text of either in an error Ray or MLflow passed on as a message."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
            return True
        if any(text in str(e).lower() for text in DISK_FULL_TEXT):
            return True
    return False


def end_reason(exc: BaseException) -> tuple[str, str]:
    """(MLflow run status, reason) for a block ended by `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return "KILLED", f"exited ({exc.code})"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # Ray passes a callback's or a worker's error on as the text of its traceback: its last line
    # names the exception that was raised
    summary = lines[-1] if lines and lines[0].startswith("Traceback") else " ".join(lines[:3])
    text = f"{type(exc).__name__}: {summary}".strip()
    if is_disk_full(exc):
        text = f"disk full: {text}"
    return "FAILED", text[:1000]


def end_run(client: MlflowClient, run_id: str, status: str, reason: str, *, only_running: bool = True) -> bool:
    """End `run_id` with `status` and tag `reason`, unless (`only_running`) it has ended already.
    Returns whether it was ended here; never raises (prints a warning instead)."""
    try:
        if only_running and client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, END_REASON_TAG, reason[:5000])
        client.set_terminated(run_id, status)
        return True
    except Exception as exc:  # the store is what failed (a full disk): the caller's error is the news
        print(f"warning: could not mark MLflow run {run_id} {status} ({type(exc).__name__}: {exc})"[:400], flush=True)
        return False


def end_children(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str, reason: str) -> int:
    """End the still-RUNNING child runs of `parent_run_id`; returns how many. Never raises."""
    from tuning.tracking.store import filter_literal

    try:
        runs = client.search_runs([experiment_id], max_results=5000, filter_string=(
            f"tags.`mlflow.parentRunId` = {filter_literal(parent_run_id)} and attributes.status = 'RUNNING'"))
    except Exception as exc:
        print(f"warning: could not list the runs of {parent_run_id} ({type(exc).__name__}: {exc})"[:400], flush=True)
        return 0
    return sum(end_run(client, r.info.run_id, status, reason, only_running=False) for r in runs)


def reserve_space(folder: Path, size: int = RESERVE_BYTES) -> Path | None:
    """Hold `size` bytes in a file in `folder` (created) until `release_reserves`: when the disk
    fills up, releasing it leaves MLflow's store on that disk room to record the runs' end.
    Returns the file (None if it could not be written: the preflight said why already)."""
    path = Path(folder) / RESERVE_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * size)  # written, not sparse: the blocks are really taken
    except OSError:
        path.unlink(missing_ok=True)
        return None
    _reserves.append(path)
    return path


def release_reserves() -> None:
    """Delete the files of `reserve_space` (a full disk ends the runs, or the command ends)."""
    while _reserves:
        _reserves.pop().unlink(missing_ok=True)


class DiskGuard(Callback):
    """Tune callback that stops a search whose disk is about to be full: at most once a second it
    checks the free space of `folder` and raises OSError(ENOSPC) when less than `min_free` bytes
    (one more checkpoint) are left, before trials and Tune's own state saves fail on it (a full
    disk otherwise floods the console with tracebacks: every trial's, and Tune's state save every
    second). The search's owner then ends its runs FAILED and says so in one line; --resume
    continues once space is freed."""

    def __init__(self, folder: str | Path, min_free: int):
        self.folder, self.min_free = str(folder), int(min_free)
        self._checked = 0.0

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return
        if free < self.min_free:
            raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MB left under {self.folder}, less than the "
                                        f"{self.min_free / 2**20:.0f} MB one more checkpoint needs; search stopped")


@contextlib.contextmanager
def owned_run(client: MlflowClient, run_id: str, *, children: bool = False) -> Iterator[str]:
    """Own the end of `run_id` for the block (see the module's docstring); yields `run_id`."""
    try:
        yield run_id
    except BaseException as exc:
        status, reason = end_reason(exc)
        if is_disk_full(exc):
            release_reserves()
        end_run(client, run_id, status, reason)
        if children:
            try:
                exp_id = client.get_run(run_id).info.experiment_id
            except Exception:
                exp_id = None
            if exp_id is not None:
                end_children(client, exp_id, run_id, status, f"parent run ended: {reason}")
        raise
    end_run(client, run_id, "FINISHED", "completed")


@contextlib.contextmanager
def ends_on_error(client: MlflowClient, run_id: str) -> Iterator[str]:
    """Like `owned_run`, for a block after which the run goes on: ended only if the block raises."""
    try:
        yield run_id
    except BaseException as exc:
        if is_disk_full(exc):
            release_reserves()
        end_run(client, run_id, *end_reason(exc))
        raise


def disk_full_message(exc: BaseException, folder: str | Path, needed: int | None = None,
                      next_step: str = "continue with the same command plus --resume") -> str | None:
    """One line for a command that stopped on a full disk (None if `exc` is something else): the
    folder, its free space now, the space a run of this size needs, and what to do next."""
    if not is_disk_full(exc):
        return None
    existing = Path(folder).absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    free = shutil.disk_usage(existing).free / 2**20
    need = f", about {needed / 2**20:.0f} MB needed" if needed else ""
    cause = next((str(e).splitlines()[0] for e in _chain(exc) if isinstance(e, (OSError, sqlite3.Error))),
                 f"{type(exc).__name__}")
    return (f"the disk holding {Path(folder).absolute()} is full ({cause[:200]}; {free:.0f} MB free now{need}); "
            f"free space, then {next_step}")


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Set a run that continues (a resumed search, trial or final step) RUNNING again, without the
    reason it ended last time."""
    client.update_run(run_id, status="RUNNING")
    if END_REASON_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, END_REASON_TAG)
