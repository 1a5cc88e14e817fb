"""Several searches at once on the Ray cluster a command runs on: `run_concurrently`.

`compare.py --tune-each` runs one search per variant and `search.py --outer-folds K` one per outer
fold. One after another, the cluster idles whenever a search's last trials run fewer than it holds
(ASHA stops one trial early, the other runs on alone) and between searches (a search's own start
and end); on a cluster of many GPUs a search of 4 trials leaves the rest idle throughout.

Ray Tune runs one experiment per driver process (its control loop, its Ctrl-C handling, the
environment variables it reads), so each search runs in a process of its own: a child of the
command, a second Ray driver joined to the same cluster (`ray.init(address=...)` with the command's
runtime environment), as `search.py --address` joins one. The cluster's trial slots (trials whose
Ray Train workers fit at once, `tuning.hpo.tuner.trial_concurrency`) are shared out in lanes: with
S slots and N searches, min(S, N) lanes run searches one after another, lane i with a share of
S // lanes slots (one more for the first S % lanes), its search's `max_concurrent_trials`. The
shares add up to the slots, so a trial never waits for CPUs that another search's trial holds (its
Ray Train worker group would wait out its start timeout and start over).

What the children print reaches the console line by line, each line after its search's label.
Ctrl-C: the children run in sessions of their own (a terminal's Ctrl-C reaches the command only),
and the command sends each running child one SIGINT, which Tune handles as in a search of its own
(state saved, trials stopped); no waiting search is started; the command raises once every child
has ended. A child whose command has died (SIGKILL) interrupts itself the same way within a second,
so no search runs on without its command. A child's failure comes back as a `ChildFailure`
naming its label: ConfigError and Ctrl-C as such, anything else with its one-line message (the
traceback printed by the child, under its label).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cfcml.config import ConfigError

INTERRUPTED, CONFIG, FAILED = "interrupted", "config", "failed"  # ChildFailure.kind
EXIT = {INTERRUPTED: 130, CONFIG: 2, FAILED: 1}


@dataclasses.dataclass(frozen=True)
class SearchJob:
    """One search to run in a child process.

    Args:
        label: what its console lines start with, e.g. "film" or "outer 1".
        func: a module-level function (pickled by reference), called in the child as
            `func(*args, max_concurrent=share)` with Ray joined; it returns nothing (what it
            produces, it writes to disk: a search's `outcome.json`).
        args: its arguments, picklable (a `SearchRun`, a folder).
    """

    label: str
    func: Callable[..., None]
    args: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChildFailure:
    """A search that did not finish: `kind` is "interrupted" (Ctrl-C, or never started after one),
    "config" (a ConfigError in the child) or "failed" (anything else); `message` its one line."""

    label: str
    kind: str
    message: str


def lane_shares(slots: int, searches: int) -> list[int]:
    """The trial slots of each lane: min(slots, searches) lanes whose shares add up to `slots`.

    >>> lane_shares(2, 13), lane_shares(8, 3), lane_shares(1, 4)
    ([1, 1], [3, 3, 2], [1])

    Raises:
        ValueError: `slots` or `searches` below 1.
    """
    if slots < 1 or searches < 1:
        raise ValueError(f"expected at least one slot and one search, got {slots} and {searches}")
    lanes = min(slots, searches)
    base, extra = divmod(slots, lanes)
    return [base + (1 if i < extra else 0) for i in range(lanes)]


@dataclasses.dataclass
class _Payload:
    """What a child reads from its stdin (pickled)."""

    job: SearchJob
    share: int
    address: str
    runtime_env: dict[str, Any] | None
    verbose: bool
    parent_pid: int
    error_file: str


def _runtime_env() -> dict[str, Any] | None:
    """This driver's runtime environment (a local Ray's env vars and worker hook), without Ray's own
    internal variables; the children join with it."""
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    if "env_vars" in env:
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if not k.startswith("__")}
    return env or None


def run_concurrently(jobs: Sequence[SearchJob], slots: int, *, verbose: bool = False,
                     print_line: Callable[[str], None] = print) -> list[ChildFailure]:
    """Run `jobs` in child processes, at most `lane_shares(slots, len(jobs))` at once; Ray must be
    initialised in this process (the children join its cluster).

    Args:
        jobs: the searches, started in this order.
        slots: trials the cluster runs at once (>= 1).
        verbose: the children forward their Ray workers' logs (as `--verbose`).
        print_line: where each child's output line goes, after `[label] `.

    Returns:
        The jobs that did not finish (empty when all did), in the order of `jobs`.

    Raises:
        ValueError: no job, or fewer than one slot.
    """
    import ray

    shares = lane_shares(slots, len(jobs))
    address = ray.get_runtime_context().gcs_address
    env = _runtime_env()
    queue = list(jobs)
    lock = threading.Lock()
    stopping = threading.Event()
    running: dict[str, subprocess.Popen] = {}
    failures: dict[str, ChildFailure] = {}

    def emit(label: str, line: str) -> None:
        with lock:
            print_line(f"[{label}] {line}")

    def lane(share: int, finished: threading.Event) -> None:
        try:
            while not stopping.is_set():
                with lock:
                    if not queue:
                        return
                    job = queue.pop(0)
                failure = _run_child(job, share, address, env, verbose, running, lock, emit)
                if failure is not None:
                    failures[job.label] = failure
        finally:
            finished.set()

    # Each lane says when it has finished: a Thread.join interrupted by Ctrl-C can leave the thread
    # reported dead while it runs on (CPython gh-90882), so the lanes are not joined.
    done = [threading.Event() for _ in shares]
    for i, (share, finished) in enumerate(zip(shares, done, strict=True)):
        threading.Thread(target=lane, args=(share, finished), daemon=True, name=f"search-lane-{i}").start()
    while not all(e.is_set() for e in done):
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:  # each running child gets one SIGINT per Ctrl-C; no waiting one starts
            stopping.set()
            _interrupt(running, lock)
    for job in jobs:
        if job.label not in failures and stopping.is_set() and job in queue:
            failures[job.label] = ChildFailure(job.label, INTERRUPTED, "not started (Ctrl-C)")
    return [failures[j.label] for j in jobs if j.label in failures]


def _interrupt(running: dict[str, subprocess.Popen], lock: threading.Lock) -> None:
    with lock:
        procs = list(running.values())
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)


def _run_child(job: SearchJob, share: int, address: str, env: dict[str, Any] | None, verbose: bool,
               running: dict[str, subprocess.Popen], lock: threading.Lock,
               emit: Callable[[str, str], None]) -> ChildFailure | None:
    with tempfile.TemporaryDirectory(prefix="cfcml-child-") as tmp:
        error_file = str(Path(tmp) / "error.json")
        payload = _Payload(job, share, address, env, verbose, os.getpid(), error_file)
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1"}
        with lock:
            proc = subprocess.Popen([sys.executable, "-m", "tuning.runtime.concurrent"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                    start_new_session=True, encoding="utf-8", errors="replace")
            running[job.label] = proc
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.buffer.write(pickle.dumps(payload))  # type: ignore[attr-defined]
            proc.stdin.close()
            for line in proc.stdout:
                emit(job.label, line.rstrip("\n"))
            code = proc.wait()
        finally:
            with lock:
                running.pop(job.label, None)
        if code == 0:
            return None
        try:
            record = json.loads(Path(error_file).read_text(encoding="utf-8"))
            return ChildFailure(job.label, record["kind"], record["message"])
        except (OSError, ValueError, KeyError):
            kind = INTERRUPTED if code in (130, -signal.SIGINT) else FAILED
            return ChildFailure(job.label, kind, f"its process ended with status {code}")


def _watch_parent(parent_pid: int) -> None:
    """SIGINT to this process once its parent is gone (the command was killed): Tune saves the
    search's state and stops, as on Ctrl-C."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _child_main() -> int:
    payload: _Payload = pickle.load(sys.stdin.buffer)
    # The command's SIGINT (Ctrl-C forwarded, or this child's own when the command died) must reach
    # Tune, also where the command was started with SIGINT ignored (`nohup ... &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _watch_parent(payload.parent_pid)
    record: dict[str, str] | None = None
    try:
        import logging

        import ray

        from tuning.runtime.ray_cluster import quiet_logs

        quiet_logs(payload.verbose)
        ray.init(address=payload.address, runtime_env=payload.runtime_env, log_to_driver=payload.verbose,
                 logging_level=logging.INFO if payload.verbose else logging.WARNING)
        try:
            payload.job.func(*payload.job.args, max_concurrent=payload.share)
        finally:
            ray.shutdown()
    except KeyboardInterrupt as exc:  # Ctrl-C, and the workflows' CommandInterrupted / SearchInterrupted
        record = {"kind": INTERRUPTED, "message": str(exc) or "interrupted"}
    except ConfigError as exc:
        record = {"kind": CONFIG, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the command, with the traceback printed here
        import traceback

        traceback.print_exc()
        record = {"kind": FAILED, "message": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    if record is None:
        return 0
    Path(payload.error_file).write_text(json.dumps(record), encoding="utf-8")
    return EXIT[record["kind"]]


if __name__ == "__main__":
    sys.exit(_child_main())
