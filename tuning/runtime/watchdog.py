"""A Tune callback that fails a trial which has gone silent, naming what it waits for.

A trial whose Ray Train run cannot start (a placement group that never gets its CPUs, workers
that never come up) reports nothing, and Tune waits on it for as long as the search runs.
`TrialWatchdog` watches the time since each running trial started or last reported. Past
`stall_s` plus the longest such silence seen from any trial that did report (a slow machine's
first epoch is not a stall), it asks the cluster what the trial waits for (`waiting_for`).

- A trial whose Ray Train workers are all alive is training, only slowly (a busy machine; how
  slowly one was: docs/architecture.md, "A trial that never reports"): it is named once and
  waited for.
- Any other trial (waiting for its controller, a placement group, its workers' submission or
  start) is stuck once it has stayed in that one state for half the stall limit
  (`TrialWatchdog.confirm_s`): a live run passes through the same states on its way (its workers
  done and its result in transit, a worker group restarting), for seconds, and on a busy machine
  for over 20 s. A stuck trial is named in one line, with what it waits for; the line is written
  beside the trial's results (`STALL_FILE`, read back by `tuning.tracking.callbacks.failure_reason`
  as the trial run's `cfcml.failure_reason` tag) and the trial's actor is killed. Tune then
  records the trial as failed (`FailureConfig(max_failures=0)`, Tune's default) and the search
  goes on: the other trials, the final model, and `--resume` (which retries failed trials).

A hung collective among live workers is left to torch's own timeout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.tune.experiment import Trial

STALL_FILE = "cfcml_stalled.txt"  # in a trial's folder: why the watchdog failed it


@dataclass(frozen=True)
class TrialWait:
    """What a silent trial waits for.

    what: a phrase, e.g. "a placement group of [{'CPU': 1.0}] (pending; ...)";
    training: True when all its Ray Train workers are alive (it is training, slowly);
    kind: the state without its figures ("actor", "controller", "request", "placement_group",
        "submission", "start", "training"), what `TrialWatchdog` compares between checks.
    """

    what: str
    training: bool = False
    kind: str = ""


def waiting_for(trial_actor_id: str) -> TrialWait:
    """What the trial whose Tune actor is `trial_actor_id` (hex) waits for: its actor, its Ray
    Train controller, a placement group (with the cluster's free CPUs), its workers' submission or
    start, or an epoch from workers that are alive (`training`).

    Reads the GCS's actor and placement-group tables (`tuning.runtime.placement_groups`); raises what Ray
    raises when they cannot be read."""
    import ray
    from ray.core.generated import gcs_pb2

    from tuning.runtime.placement_groups import _accessor, job_placement_groups

    name = gcs_pb2.ActorTableData.ActorState.Name
    actors = [gcs_pb2.ActorTableData.FromString(raw) for raw in _accessor().get_actor_table(None, None)]
    by_id = {a.actor_id.hex(): a for a in actors}
    trial = by_id.get(trial_actor_id)
    if trial is None or name(trial.state) != "ALIVE":
        return TrialWait(f"its trial actor to start ({'not registered' if trial is None else name(trial.state)})",
                         kind="actor")
    home = (trial.address.ip_address, trial.address.port)
    controllers = {a.actor_id.hex() for a in actors if a.class_name.endswith("TrainController")
                   and (a.owner_address.ip_address, a.owner_address.port) == home and name(a.state) != "DEAD"}
    if not controllers:
        return TrialWait("its Ray Train controller to start", kind="controller")
    groups = [g for g in job_placement_groups() if g.creator_actor_id in controllers]
    if not groups:
        return TrialWait("its Ray Train controller to ask for its workers' resources", kind="request")
    pending = [g for g in groups if g.state != "CREATED"]
    if pending:
        need = [dict(b) for b in pending[-1].bundles]
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        return TrialWait(f"a placement group of {need} ({pending[-1].state.lower()}; the cluster has {free} "
                         f"free: other trials or programs hold the rest)", kind="placement_group")
    group_ids = {g.placement_group_id for g in groups}
    workers = [a for a in actors if a.placement_group_id.hex() in group_ids and name(a.state) != "DEAD"]
    if not workers:
        return TrialWait("its Ray Train workers to be submitted (their placement group is ready)", kind="submission")
    alive = sum(name(a.state) == "ALIVE" for a in workers)
    if alive < len(workers):
        return TrialWait(f"its Ray Train workers to start ({alive} of {len(workers)} alive)", kind="start")
    return TrialWait(f"an epoch from its {alive} Ray Train worker(s), alive and training", training=True,
                     kind="training")


class TrialWatchdog(Callback):
    """Tune callback: fail a trial that has reported nothing for too long (module docstring).

    Args:
        stall_s: seconds of silence allowed on top of the longest silence seen so far (from a
            trial's start to its first report, or between two reports); positive
            (`train.stall_timeout_s`).
        period_s: seconds between checks, positive.
    """

    def __init__(self, stall_s: float, period_s: float = 5.0):
        if not stall_s > 0 or not period_s > 0:
            raise ValueError(f"stall_s and period_s must be positive, got {stall_s} and {period_s}")
        self.stall_s, self.period_s = float(stall_s), float(period_s)
        self._since: dict[str, float] = {}  # trial id -> when it started or last reported (monotonic)
        self.longest_s = 0.0
        self.failed: dict[str, str] = {}  # trial id -> the line printed
        self.noted: set[str] = set()  # trials named once as training slowly
        self._held: dict[str, tuple[str, float]] = {}  # trial id -> (the state it is stuck in, first seen)
        self._checked = 0.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a restored search: the monotonic clock of another process means nothing here
        self.__dict__.update({"noted": set(), **state, "_since": {}, "_held": {}, "_checked": 0.0})

    @property
    def limit_s(self) -> float:
        return self.stall_s + self.longest_s

    @property
    def confirm_s(self) -> float:
        """How long a silent trial must stay in one state that is not training before it counts as
        stuck: half the stall limit. A live run passes through the same states for a moment (its
        workers done and its result on the way; a worker group restarting): on a busy machine
        that moment lasted over 20 s, and a one-look verdict killed a trial that was finishing."""
        return self.stall_s / 2

    def decide(self, trial_id: str, wait: TrialWait, now: float) -> str:
        """"note" (alive and training), "fail" (stuck in the same state for `confirm_s`) or "wait"
        (a state seen for the first time, or changed since the last check: a run that moves on)."""
        if wait.training:
            self._held.pop(trial_id, None)
            return "note"
        kind, since = self._held.get(trial_id, ("", now))
        if kind != (wait.kind or wait.what):
            self._held[trial_id] = (wait.kind or wait.what, now)
            return "wait"
        return "fail" if now - since >= self.confirm_s else "wait"

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._since[trial.trial_id] = time.monotonic()
        folder = getattr(trial, "local_path", None)
        if folder:  # a failed trial retried by --resume starts with no verdict
            (Path(folder) / STALL_FILE).unlink(missing_ok=True)
        self.failed.pop(trial.trial_id, None)
        self.noted.discard(trial.trial_id)
        self._held.pop(trial.trial_id, None)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        now = time.monotonic()
        since = self._since.get(trial.trial_id)
        if since is not None:
            self.longest_s = max(self.longest_s, now - since)
        self._since[trial.trial_id] = now
        self._held.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._since.pop(trial.trial_id, None)
        self._held.pop(trial.trial_id, None)

    on_trial_error = on_trial_complete

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if now - self._checked < self.period_s:
            return
        self._checked = now
        for trial in trials:
            if trial.status != "RUNNING" or trial.trial_id in self.failed:
                continue
            since = self._since.setdefault(trial.trial_id, now)  # running before this driver knew it
            if now - since > self.limit_s:
                self.check(trial, now - since)

    def check(self, trial: Trial, silent_s: float) -> None:
        """Ask what silent `trial` waits for: name a slow trial once and wait, fail a stuck one."""
        actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
        try:
            wait = waiting_for(actor._actor_id.hex()) if actor is not None else TrialWait("its trial actor to start")
        except Exception as exc:  # the GCS tables could not be read: say so, fail it all the same
            wait = TrialWait(f"something the cluster state does not show ({type(exc).__name__})")
        verdict = self.decide(trial.trial_id, wait, time.monotonic())
        if verdict == "fail":
            self.fail(trial, actor, silent_s, wait.what)
        elif verdict == "note" and trial.trial_id not in self.noted:
            self.noted.add(trial.trial_id)
            print(f"[cfcml] trial {trial.trial_id}: nothing reported for {silent_s:.0f} s, but its workers are "
                  f"alive and training (a busy machine?): waiting", flush=True)

    def fail(self, trial: Trial, actor: ActorHandle | None, silent_s: float, waits: str) -> None:
        """Name `trial` and what it waits for on the console and in its folder, and kill its actor."""
        import ray

        line = (f"trial {trial.trial_id} stalled: nothing reported for {silent_s:.0f} s (limit {self.limit_s:.0f} s "
                f"= train.stall_timeout_s {self.stall_s:.0f} s + the longest silence seen {self.longest_s:.0f} s); "
                f"it was waiting for {waits}. Failed so that the search goes on")
        self.failed[trial.trial_id] = line
        print(f"[cfcml] {line}", flush=True)
        folder = getattr(trial, "local_path", None)
        if folder:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                (Path(folder) / STALL_FILE).write_text(line + "\n", encoding="utf-8")
            except OSError:
                pass
        if actor is not None:
            ray.kill(actor, no_restart=True)
