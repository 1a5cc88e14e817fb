"""Freeing the CPUs of Ray Train runs that Tune stopped at a bad moment.

When Tune stops a trial (ASHA's early stopping; a trial that reaches its last epoch ends by
itself, `tuning.driver.search_algorithms`) it ends the trial's actor, and with it the Ray Train
controller that the actor started. Ray Train frees the controller's placement group (its workers'
CPUs) itself in two ways: the controller's own shutdown, and a detached `PlacementGroupCleaner`
that watches the controller. Neither covers one race, seen on Ray 2.60: the dying controller saw
its worker die first (killed with it), took that for a worker crash, and started a new worker
group on a new placement group before it died; that placement group was never registered with the
cleaner, and Ray does not remove it with its dead creator. Its CPUs stay reserved for the rest of
the session, so the next trial's workers wait out Ray Train's start timeout (300 s) and retry
forever.

`PlacementGroupJanitor` (a Tune callback on the driver) removes such placement groups: created by
this job, not detached, every bundle a Ray Train worker's (CPU, and no Tune `memory` marker), and
used by no actor that is alive or being created on two checks `period_s` apart.
"""
from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback


def orphaned_placement_groups() -> set[str]:
    """Ids (hex) of this job's created, non-detached placement groups of Ray Train worker bundles
    (each with CPU, none with Tune's `memory` marker) that no live or pending actor uses.

    Raises whatever Ray's state API raises when it cannot be reached (no dashboard)."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    context = ray.get_runtime_context()
    address, job = context.gcs_address, context.get_job_id()
    groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")], detail=True,
                                   limit=10_000, raise_on_missing_output=False)
    actors = list_actors(address=address, filters=[("state", "!=", "DEAD")], detail=True, limit=10_000,
                         raise_on_missing_output=False)
    in_use = {a.placement_group_id for a in actors if a.placement_group_id}
    out = set()
    for group in groups:
        bundles = [b.get("unit_resources") or {} for b in group.bundles or []]
        if (group.creator_job_id == job and not group.is_detached and group.placement_group_id not in in_use
                and bundles and all(b.get("CPU", 0) > 0 and "memory" not in b for b in bundles)):
            out.add(group.placement_group_id)
    return out


def remove_placement_groups(ids: set[str]) -> None:
    """Remove the placement groups `ids` (hex), freeing their resources."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in ids:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


class PlacementGroupJanitor(Callback):
    """Tune callback: every `period_s` seconds, remove the Ray Train placement groups found
    orphaned (`orphaned_placement_groups`) on this check and the one before, and say so once.

    Args:
        period_s: seconds between checks, positive; a placement group is removed after it has
            been orphaned for at least this long (a worker group's actors are submitted within
            milliseconds of its placement group being ready).
    """

    def __init__(self, period_s: float = 2.0):
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.period_s = period_s
        self._checked = 0.0
        self._suspects: set[str] = set()
        self.removed: list[str] = []

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._checked < self.period_s:
            return
        self._checked = time.monotonic()
        self.sweep()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # No trial of this search runs any more: what is orphaned now goes at once (on a Ray that
        # outlives the search, such as a cluster, its CPUs would otherwise stay reserved).
        self.sweep(at_once=True)

    def sweep(self, at_once: bool = False) -> set[str]:
        """One check; returns the ids removed by it. `at_once`: remove what is orphaned now,
        without waiting for a second sighting (no Ray Train run of this job is starting)."""
        try:
            found = orphaned_placement_groups()
        except Exception:  # the state API is unavailable (no dashboard): Ray Train's own cleaner remains
            return set()
        gone = found if at_once else found & self._suspects
        self._suspects = found - gone
        if gone:
            remove_placement_groups(gone)
            self.removed.extend(sorted(gone))
            print(f"[cfcml] freed {len(gone)} placement group(s) left by a stopped trial's Ray Train run",
                  flush=True)
        return gone
