"""Which placement groups the janitor may free (`tuning.runtime.placement_groups.orphans`): only those
whose creator is an actor known to be dead, by the group's own record or by the actor table."""
from __future__ import annotations

import pytest

from tuning.runtime.placement_groups import GroupRecord, orphans


def _group(creator: str = "c1", dead: bool = False, state: str = "CREATED", detached: bool = False) -> GroupRecord:
    return GroupRecord("pg", state, creator, dead, detached, ({"CPU": 1.0},))


@pytest.mark.parametrize("group,dead_actors,freed", [
    (_group(dead=True), set(), True),  # the group's record says its creator died
    (_group(), {"c1"}, True),  # registered after the GCS handled its creator's death: the actor table says so
    (_group(), set(), False),  # a live controller's group, however long its workers take to start
    (_group(), {"c2"}, False),  # another actor died
    (_group(creator=""), {"c1"}, False),  # the driver's (Tune's trial groups, a user's)
    (_group(dead=True, detached=True), {"c1"}, False),  # detached: outlives its creator by design
    (_group(dead=True, state="REMOVED"), {"c1"}, False),  # gone already
    (_group(state="PENDING"), {"c1"}, True),  # a dead controller's group still waiting for CPUs
])
def test_a_group_is_freed_only_when_its_creator_actor_is_known_to_be_dead(group, dead_actors, freed) -> None:
    assert orphans([group], dead_actors) == ({"pg"} if freed else set())
