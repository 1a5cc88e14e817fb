"""Freeing the CPUs of Ray Train runs whose controller is gone, and never those of a live run.

When Tune stops a trial (ASHA's early stopping, Ctrl-C, a trial failed by `tuning.runtime.watchdog`) it
ends the trial's actor, and with it the Ray Train controller that the actor started (an owned
actor dies with its owner). Ray Train frees the controller's placement group (its workers' CPUs)
itself in two ways: the controller's own shutdown, and a detached `PlacementGroupCleaner` that
watches the controller. Neither covers one race, seen on Ray 2.60: the dying controller saw its
worker die first (killed with it), took that for a worker crash, and started a new worker group on
a new placement group before it died; that placement group was never registered with the cleaner
(ray-project/ray#54305 reports placement groups of stopped Train runs left behind; the cleaner came
with ray-project/ray#58515). Its CPUs stay reserved, so the next trial's workers wait out Ray
Train's start timeout and retry forever.

Ray's GCS records who created each placement group and whether that creator died
(`PlacementGroupTableData.creator_actor_id`, `creator_actor_dead`). It removes a placement group
of a dead creator actor only once the creator's job has ended too (the driver), which for a search
is the end of the command. `PlacementGroupJanitor` (a Tune callback on the driver) removes it as
soon as the GCS says its creator actor is dead: a Ray Train worker group's placement group is
created by its controller actor (`ray.train.v2 ... WorkerGroup._create_placement_group`, run in the
controller), and a dead controller has no run to give it to. No timing decides it: a live
controller's placement group is kept however long it waits for its workers (an earlier janitor
removed groups no actor used on two checks 2 s apart and, on a loaded machine, took live runs'
groups in the seconds between their placement group being ready and their workers being
submitted; those trials then waited forever). Placement groups created by the driver (Tune's
trials, anything created by hand), detached ones and other jobs' are never touched.

The creator fields are not in Ray's public state API (`ray.util.state.list_placement_groups`), so
the GCS tables are read through `ray._private.state` (its `placement_group_table` parses the same
records); if that ever fails, the janitor does nothing and Ray Train's own cleaner remains.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


@dataclass(frozen=True)
class GroupRecord:
    """One placement group as the GCS records it.

    placement_group_id, creator_actor_id: hex ids ("" for a group the driver created);
    state: "PENDING", "PREPARED", "CREATED", "REMOVED" or "RESCHEDULING";
    bundles: each bundle's resources, e.g. [{"CPU": 1.0}].
    """

    placement_group_id: str
    state: str
    creator_actor_id: str
    creator_actor_dead: bool
    is_detached: bool
    bundles: tuple[dict[str, float], ...]


def _accessor() -> Any:
    """The driver's connected GCS accessor (Ray must be initialised)."""
    from ray._private.state import state

    return state._connect_and_get_accessor()


def job_placement_groups() -> list[GroupRecord]:
    """The placement groups this job (the driver's) created, removed ones left out.

    Raises whatever Ray raises when its GCS cannot be read (Ray not initialised)."""
    import ray
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    out = []
    for raw in _accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        state = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(data.state)
        if data.creator_job_id.hex() != job or state == "REMOVED":
            continue
        creator = ray.ActorID(data.creator_actor_id) if data.creator_actor_id else None
        out.append(GroupRecord(
            placement_group_id=data.placement_group_id.hex(), state=state,
            creator_actor_id="" if creator is None or creator.is_nil() else creator.hex(),
            creator_actor_dead=bool(data.creator_actor_dead), is_detached=bool(data.is_detached),
            bundles=tuple(dict(b.unit_resources) for b in data.bundles),
        ))
    return out


def dead_actors(actor_ids: set[str]) -> set[str]:
    """Of `actor_ids` (hex), those the GCS's actor table records as DEAD (an id it does not know is
    not known to be dead). Raises whatever Ray raises when its GCS cannot be read."""
    import ray
    from ray.core.generated import gcs_pb2

    accessor = _accessor()
    out = set()
    for actor_id in actor_ids:
        raw = accessor.get_actor_info(ray.ActorID(bytes.fromhex(actor_id)))
        if raw is not None and gcs_pb2.ActorTableData.FromString(raw).state == gcs_pb2.ActorTableData.DEAD:
            out.add(actor_id)
    return out


def orphans(groups: list[GroupRecord], dead: set[str]) -> set[str]:
    """Ids of the `groups` whose creator is an actor known to be dead: the placement group's own
    record says so (`creator_actor_dead`), or the creator is in `dead` (the actor table's DEAD
    actors). Groups the driver created, detached ones and removed ones are never orphans."""
    return {g.placement_group_id for g in groups
            if g.creator_actor_id and not g.is_detached and g.state != "REMOVED"
            and (g.creator_actor_dead or g.creator_actor_id in dead)}


def orphaned_placement_groups() -> set[str]:
    """Ids (hex) of this job's placement groups whose creator was an actor that the GCS records as
    dead, not detached and not removed yet (`orphans`). Raises whatever Ray raises when its GCS
    cannot be read.

    Both GCS tables are asked: a placement group's `creator_actor_dead` is set when the GCS handles
    its creator's death, and a group whose registration reached the GCS after that (a controller
    killed with its trial while it starts a new worker group: the group registered 4 ms after the
    trial's own group was removed, seen 2026-12-07) keeps `creator_actor_dead` false for good,
    while the actor table says DEAD. Two such groups held both CPUs of a `make demo`-sized search
    and its next trial waited out Ray Train's 300 s start timeout, then again."""
    groups = job_placement_groups()
    creators = {g.creator_actor_id for g in groups if g.creator_actor_id and not g.creator_actor_dead}
    return orphans(groups, dead_actors(creators) if creators else set())


def remove_placement_groups(ids: set[str]) -> None:
    """Remove the placement groups `ids` (hex), freeing their resources."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in ids:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


class PlacementGroupJanitor(Callback):
    """Tune callback: at most every `period_s` seconds, remove the placement groups of this job
    whose creator actor is dead (`orphaned_placement_groups`; the module docstring says why that is
    safe), and say so in one line.

    Args:
        period_s: seconds between checks, positive. It only sets how soon freed CPUs come back
            (each check reads the GCS's placement-group table once); what is removed does not
            depend on it.
    """

    def __init__(self, period_s: float = 2.0):
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.period_s = period_s
        self._checked = 0.0
        self.removed: list[str] = []

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if time.monotonic() - self._checked < self.period_s:
            return
        self._checked = time.monotonic()
        self.sweep()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # on a Ray that outlives the search (a cluster), what its stopped trials left goes now
        self.sweep()

    def sweep(self) -> set[str]:
        """One check; returns the ids (hex) it removed."""
        try:
            gone = orphaned_placement_groups()
        except Exception:  # the GCS cannot be read this way: Ray Train's own cleaner remains
            return set()
        if gone:
            remove_placement_groups(gone)
            self.removed.extend(sorted(gone))
            print(f"[cfcml] freed {len(gone)} placement group(s) left by a stopped trial's Ray Train run",
                  flush=True)
        return gone
