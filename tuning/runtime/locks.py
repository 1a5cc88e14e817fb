"""One command at a time on a search: a lock per search folder.

A second `search.py` with the same name a few seconds after the first (before the first has
created the search's folder), `--resume` of a search that is still running, or `train_final.py`
on it would pass every other check and then write into the same Tune experiment, checkpoints and
MLflow runs. `search_lock` refuses them before Ray starts, with one line naming the holder's host,
PID, start time and command.

The lock is an exclusive `fcntl.flock` on `<runs-dir>/ray/.<name>.lock`, beside the search's folder
(not in it: the folder's existence means "a search of this name was started"). The holder writes
its host, PID, start and command line into the file for the message. The operating system releases
a flock when its holder's process ends however it ends (exit, exception, Ctrl-C, SIGKILL), so a lock
left by a dead process is never in force: the file stays, its lock does not. The file is not
deleted on release (a process about to lock the old file would then hold a lock nobody else
sees), except where the lock created its folder and nothing else was put there: a command refused
by a later check leaves no runs folder behind.
Where `fcntl` is missing (Windows) commands are not locked.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cfcml.config import ConfigError


class SearchBusy(ConfigError):
    """Another command holds the search's lock."""


def lock_path(storage: Path, name: str) -> Path:
    """The lock file of search `name` whose folder is `storage/name`."""
    return Path(storage) / f".{name}.lock"


def holder_line(info: dict[str, Any]) -> str:
    """'PID 123 on host h since 2026-12-07 08:30:18 UTC (python tuning/search.py ...)'."""
    if not info:
        return "a process that has not written its name yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    command = info.get("command") or ""
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"PID {info.get('pid')} on {info.get('host')} since {since}" + (f" ({command})" if command else "")


def read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def search_lock(storage: Path, name: str, what: str = "search") -> Iterator[Path]:
    """Hold search `name`'s lock (`lock_path`) for the block; raise SearchBusy (one line naming
    the holder) at once if another process holds it. Creates `storage` if needed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): not locked
        yield lock_path(storage, name)
        return
    path = lock_path(storage, name)
    made = []  # the folders this lock creates: removed again if nothing else was put in them
    folder = path.parent.absolute()
    while not folder.exists() and folder.parent != folder:
        made.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchBusy(f"{what} {name!r} is in use by another command: {holder_line(read_holder(path))}; "
                             f"wait for it to end (or stop it), then run this again; lock file {path}") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "command": " ".join([Path(sys.executable).name, *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # no holder: the file stays, unlocked
            if made and list(path.parent.iterdir()) == [path]:
                # a command refused before it wrote anything leaves no runs folder behind
                path.unlink()
                for created in made:
                    with contextlib.suppress(OSError):
                        created.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
