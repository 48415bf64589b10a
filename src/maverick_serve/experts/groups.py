"""Expert-parallel groups that follow the engine tier (`experts.engines_per_group`).

Each group is `ep_degree` expert workers in a placement group of their own, serving up to
`engines_per_group` engine replicas. An engine replica joins the first group with room (a new
group starts when none has), renews its lease while it lives and leaves when Serve stops it;
the group stops with the last engine that leaves it, or when the last lease lapses (an engine
that died without leaving). So when the autoscaler adds or removes engine replicas, expert
workers come and go with them, a whole EP group at a time.

`GroupBook` is the bookkeeping (pure, a clock passed in); `ExpertGroupRegistry` runs it as one
named, detached Ray actor per tier and stops emptied groups' workers. Every group start gets a
new generation (and the registry's own token) in its name, so a group started again never finds
a dying actor of an earlier one under the same name, not even after the registry was restarted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def registry_name(prefix: str, engines_per_group: int, lease_s: float, ep_degree: int) -> str:
    """The registry of a tier with these settings: a redeploy that changes them gets a registry
    of its own instead of one still holding the old settings (Ray's `get_if_exists` ignores the
    arguments of an actor that exists)."""
    digest = hashlib.sha256(f"{engines_per_group}/{lease_s}/{ep_degree}".encode()).hexdigest()[:8]
    return f"{prefix}-groups-{digest}"


def group_worker_name(group: str, worker: int) -> str:
    return f"{group}-{worker}"


def group_pg_name(group: str) -> str:
    return f"{group}-pg"


@dataclass
class _Group:
    name: str
    members: dict[str, float] = field(default_factory=dict)  # member -> lease expiry


class GroupBook:
    """Which engine replica uses which group. Contract: `join` returns the group's name (unique
    per start); `leave` and `reap` return the names of groups left without members, which the
    caller stops; a member whose lease lapsed is dropped as if it had left."""

    def __init__(self, prefix: str, engines_per_group: int, lease_s: float, token: str = "") -> None:
        self.prefix = prefix
        self.token = token  # per registry instance: a restarted registry never reuses a live name
        self.capacity = engines_per_group
        self.lease_s = lease_s
        self.groups: dict[int, _Group] = {}  # slot -> group (slots are reused, names are not)
        self.generation = 0

    def join(self, member: str, now: float) -> tuple[str, list[str]]:
        """(the member's group, groups emptied by lapsed leases on the way)."""
        emptied = self.reap(now)
        for slot in sorted(self.groups):
            group = self.groups[slot]
            if member in group.members or len(group.members) < self.capacity:
                group.members[member] = now + self.lease_s
                return group.name, emptied
        slot = next(i for i in range(len(self.groups) + 1) if i not in self.groups)
        self.generation += 1
        name = f"{self.prefix}-g{slot}.{self.generation}{self.token}"
        group = _Group(name, {member: now + self.lease_s})
        self.groups[slot] = group
        return group.name, emptied

    def renew(self, member: str, now: float) -> bool:
        """False when the member is no longer in a group (its lease lapsed: it must join again)."""
        for group in self.groups.values():
            if member in group.members:
                group.members[member] = now + self.lease_s
                return True
        return False

    def leave(self, member: str, now: float) -> list[str]:
        for group in self.groups.values():
            group.members.pop(member, None)
        return self.reap(now)

    def reap(self, now: float) -> list[str]:
        emptied = []
        for slot, group in list(self.groups.items()):
            for member, expiry in list(group.members.items()):
                if expiry < now:
                    del group.members[member]
            if not group.members:
                del self.groups[slot]
                emptied.append(group.name)
        return emptied

    def snapshot(self) -> dict[str, list[str]]:
        return {g.name: sorted(g.members) for _, g in sorted(self.groups.items())}


class ExpertGroupRegistry:
    """`GroupBook` as a Ray actor (one per tier, named `<name_prefix>-groups`); stops the workers
    and placement group of every group it finds emptied."""

    def __init__(self, prefix: str, engines_per_group: int, lease_s: float, ep_degree: int) -> None:
        self.book = GroupBook(prefix, engines_per_group, lease_s, token=uuid.uuid4().hex[:6])
        self.ep_degree = ep_degree
        self.stopped: list[str] = []

    def join(self, member: str) -> str:
        name, emptied = self.book.join(member, time.monotonic())
        self._stop(emptied)
        return name

    def renew(self, member: str) -> bool:
        self._stop(self.book.reap(time.monotonic()))
        return self.book.renew(member, time.monotonic())

    def leave(self, member: str) -> list[str]:
        emptied = self.book.leave(member, time.monotonic())
        self._stop(emptied)
        return emptied

    def groups(self) -> dict[str, list[str]]:
        self._stop(self.book.reap(time.monotonic()))
        return self.book.snapshot()

    def stopped_groups(self) -> list[str]:
        return list(self.stopped)

    def _stop(self, names: list[str]) -> None:
        import ray

        for name in names:
            for i in range(self.ep_degree):
                with contextlib.suppress(ValueError):  # never started, or already gone
                    ray.kill(ray.get_actor(group_worker_name(name, i)))
            with contextlib.suppress(ValueError):
                ray.util.remove_placement_group(ray.util.get_placement_group(group_pg_name(name)))
            self.stopped.append(name)
            logger.warning("expert group %s stopped: no engine replica uses it any more", name)
