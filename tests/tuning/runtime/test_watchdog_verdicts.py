"""The watchdog's verdict on a silent trial (`TrialWatchdog.decide`): stuck only when it stays in
one state that is not training for `confirm_s`; a run that moves between states, or is training,
is waited for. The same rule on real Ray Tune and Ray Train: tests/e2e/test_watchdog.py (test basenames are unique)."""
from __future__ import annotations

import pytest

from tuning.runtime.watchdog import TrialWait, TrialWatchdog

REQUEST = TrialWait("its Ray Train controller to ask for its workers' resources", kind="request")
TRAINING = TrialWait("an epoch from its 1 Ray Train worker(s), alive and training", training=True, kind="training")


def pending(free: float) -> TrialWait:
    return TrialWait(f"a placement group of [{{'CPU': 1.0}}] (pending; the cluster has {{'CPU': {free}}} free)",
                     kind="placement_group")


def verdicts(dog: TrialWatchdog, seen: list[tuple[float, TrialWait]]) -> list[str]:
    return [dog.decide("t1", wait, at) for at, wait in seen]


def test_half_the_stall_limit_confirms_a_stuck_state() -> None:
    assert TrialWatchdog(stall_s=40).confirm_s == 20
    assert TrialWatchdog(stall_s=600).confirm_s == 300


@pytest.mark.parametrize(("seen", "expected"), [
    # one state that does not move: failed once it has held for confirm_s (20 s), not at first sight
    ([(0, REQUEST), (10, REQUEST), (20, REQUEST)], ["wait", "wait", "fail"]),
    # a placement group that never gets its CPUs: the free figure moves, the state does not
    ([(0, pending(0.49)), (12, pending(0.5)), (21, pending(0.48))], ["wait", "wait", "fail"]),
    # a run finishing on a busy machine: training, then between phases while its result is in transit
    ([(0, TRAINING), (30, REQUEST), (45, REQUEST)], ["note", "wait", "wait"]),
    # a run that moves on between checks is never failed, however long it is silent
    ([(0, REQUEST), (15, pending(0.5)), (30, TrialWait("its workers to start (0 of 1 alive)", kind="start")),
      (45, TRAINING), (60, REQUEST)], ["wait", "wait", "wait", "note", "wait"]),
])
def test_a_silent_trial_is_stuck_only_when_one_state_holds_for_half_the_limit(
        seen: list[tuple[float, TrialWait]], expected: list[str]) -> None:
    assert verdicts(TrialWatchdog(stall_s=40), seen) == expected


def test_a_result_starts_the_state_over() -> None:
    dog = TrialWatchdog(stall_s=40)
    assert dog.decide("t1", REQUEST, 0) == "wait"

    class Trial:
        trial_id = "t1"

    dog.on_trial_result(0, [], Trial(), {})
    assert dog.decide("t1", REQUEST, 25) == "wait"  # seen anew, not 25 s in that state
    assert dog.decide("t1", REQUEST, 45) == "fail"
