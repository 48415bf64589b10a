"""What one router knows about the engine replicas, at most ~2 state intervals stale.

Replicas publish load reports and cache events (block keys stored and evicted) through the
`ReplicaStateHub`; every router replica polls it and folds the updates in here. Between reports
the router also counts what it sent itself (requests and prefill work not yet started), so a
burst of requests does not all land on the replica that looked idle a moment ago, and takes the
load report that comes with each of its streams' first event when it is newer than the hub's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from maverick_serve.config.routing import RoutingConfig


@dataclass
class ReplicaLoad:
    waiting: int = 0
    running: int = 0
    queued_prefill_tokens: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    max_num_seqs: int = 0  # 0: not reported (the replica's seats are unknown)
    # Measured by the engine over its recent window; 0 = not measured yet.
    prefill_tokens_per_s: float = 0.0  # prompt tokens per second of the steps that prefilled
    step_s: float = 0.0  # mean step time
    finished_per_s: float = 0.0  # requests finished per second of step time
    step_base_s: float = 0.0  # decode step time model: base + per_seq × batch (0, 0: not fitted)
    step_per_seq_s: float = 0.0
    batch_p90: float = 0.0  # sequences per step lately (90th percentile)

    def step_at(self, batch: int) -> float:
        """Predicted decode step time with `batch` sequences (the mean step time unmodelled)."""
        if self.step_per_seq_s > 0:
            return self.step_base_s + self.step_per_seq_s * max(1, batch)
        return self.step_s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicaLoad:
        load = cls()
        for name, f in cls.__dataclass_fields__.items():
            if name in d:
                setattr(load, name, (float if f.type == "float" else int)(d[name]))
        return load


@dataclass
class ReplicaEntry:
    replica: str
    slot: int
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    seen: float = 0.0  # monotonic time of the last report
    load_at: float = float("-inf")  # the replica's stamp of `load` (`publisher.stamped_load`)
    failed_at: float = -1.0  # a request failed on it; skip until it reports again
    tier_shared: bool = True  # its KV tier is shared (Redis) rather than its own memory store
    sent_requests: int = 0  # sent by this router, not yet started (first token)
    sent_work: float = 0.0  # prefill work of those, text-token equivalents
    image_work: float = 0.0  # image work in flight from this router (until the request ends)
    image_recent: float = 0.0  # image work sent lately, decaying (half-life routing.image_memory_s)
    image_stamp: float = 0.0

    @property
    def bit(self) -> int:
        return 1 << self.slot

    def queued(self) -> int:
        return self.load.waiting + self.sent_requests

    def pending_work(self) -> float:
        return self.load.queued_prefill_tokens + self.sent_work


class BlockIndex:
    """Block key → bitmask of replica slots holding it. Bounded: the oldest keys go first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.masks: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.masks)

    def add(self, keys: Iterable[int], bit: int) -> None:
        masks = self.masks
        for key in keys:
            masks[key] = masks.pop(key, 0) | bit  # re-insert: recently stored keys live longest
        while len(masks) > self.capacity:
            del masks[next(iter(masks))]

    def remove(self, keys: Iterable[int], bit: int) -> None:
        masks = self.masks
        for key in keys:
            m = masks.get(key)
            if m is not None:
                m &= ~bit
                if m:
                    masks[key] = m
                else:
                    del masks[key]

    def clear_slot(self, bit: int) -> None:
        self.masks = {k: m & ~bit for k, m in self.masks.items() if m & ~bit}

    def prefix_blocks(self, keys: list[int], candidates: int) -> dict[int, int]:
        """Slot bit → number of leading `keys` that slot holds, for every candidate bit."""
        out: dict[int, int] = {}
        current = candidates
        masks = self.masks
        for i, key in enumerate(keys):
            nxt = current & masks.get(key, 0)
            left = current & ~nxt
            while left:
                low = left & -left
                out[low] = i
                left ^= low
            current = nxt
            if not current:
                return out
        while current:
            low = current & -current
            out[low] = len(keys)
            current ^= low
        return out


class ClusterView:
    def __init__(self, cfg: RoutingConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.replicas: dict[str, ReplicaEntry] = {}
        self.local = BlockIndex(cfg.index_capacity_blocks)  # replicas' prefix caches
        self.tier = BlockIndex(cfg.index_capacity_blocks)  # replica-own tiers (embedded store)
        self.shared_tier = BlockIndex(cfg.index_capacity_blocks)  # one shared tier (Redis), bit 1
        self.epoch: str | None = None  # the hub's; a new one means the hub restarted
        self.cursor = 0
        self.last_poll = 0.0

    # ---- updates from the hub ---------------------------------------------------------------
    def _entry(self, replica: str) -> ReplicaEntry:
        entry = self.replicas.get(replica)
        if entry is None:
            used = {e.slot for e in self.replicas.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            entry = self.replicas[replica] = ReplicaEntry(replica, slot)
        return entry

    def _forget(self, replica: str) -> None:
        """A replica is gone: O(index size), so only on departures, never per poll."""
        entry = self.replicas.pop(replica)
        self.local.clear_slot(entry.bit)
        self.tier.clear_slot(entry.bit)

    def apply(self, update: dict[str, Any]) -> None:
        """Fold in one `ReplicaStateHub.poll` answer."""
        now = self.clock()
        self.last_poll = now
        snapshot = update["epoch"] != self.epoch or bool(update.get("snapshot"))
        if snapshot:  # rebuild the indexes wholesale (clearing slot by slot is O(replicas × blocks))
            capacity = self.cfg.index_capacity_blocks
            self.local, self.tier, self.shared_tier = (BlockIndex(capacity) for _ in range(3))
            self.epoch = update["epoch"]
        self.cursor = update["cursor"]
        for event in update["events"]:
            entry = self._entry(event["replica"])
            if event.get("reset") and not snapshot:  # one replica restarted: drop what it had
                self.local.clear_slot(entry.bit)
                self.tier.clear_slot(entry.bit)
                entry.load_at = float("-inf")  # a new process: its clock's stamps start over
            entry.tier_shared = bool(event.get("tier_shared", True))
            self.local.remove(event.get("evicted", ()), entry.bit)
            self.local.add(event.get("stored", ()), entry.bit)
            (self.shared_tier if entry.tier_shared else self.tier).add(
                event.get("tier_stored", ()), 1 if entry.tier_shared else entry.bit
            )
        for replica in [r for r in self.replicas if r not in update["replicas"]]:
            self._forget(replica)  # the hub dropped it: gone
        for replica, info in update["replicas"].items():
            entry = self._entry(replica)
            self._take_load(entry, info["load"])
            entry.seen = now - float(info.get("age", 0.0))

    def _take_load(self, entry: ReplicaEntry, load: dict[str, Any]) -> None:
        at = load.get("at")  # None: unstamped (an older replica), always taken
        if at is None or float(at) >= entry.load_at:
            entry.load = ReplicaLoad.from_dict(load)
            entry.load_at = float("-inf") if at is None else float(at)

    def observe_load(self, replica: str | None, load: dict[str, Any] | None) -> None:
        """A load report that came with a stream's first event: fresher than the hub's (which
        lags up to two state intervals), so the replica's own count of the request this router
        just started is in it. Older than what the view holds, or from a replica the hub has not
        announced: ignored."""
        entry = self.replicas.get(replica) if replica is not None else None
        if entry is not None and load:
            self._take_load(entry, load)

    # ---- what the router did itself ---------------------------------------------------------
    def image_load(self, entry: ReplicaEntry) -> float:
        """In-flight image work plus the decayed image work sent lately."""
        now = self.clock()
        entry.image_recent *= 0.5 ** ((now - entry.image_stamp) / self.cfg.image_memory_s)
        entry.image_stamp = now
        return entry.image_work + entry.image_recent

    def on_sent(self, replica: str, work: float, image_work: float) -> None:
        entry = self.replicas.get(replica)
        if entry is not None:
            entry.sent_requests += 1
            entry.sent_work += work
            entry.image_work += image_work
            self.image_load(entry)
            entry.image_recent += image_work

    def on_started(self, replica: str, work: float) -> None:
        entry = self.replicas.get(replica)
        if entry is not None:
            entry.sent_requests = max(0, entry.sent_requests - 1)
            entry.sent_work = max(0.0, entry.sent_work - work)

    def on_finished(self, replica: str, image_work: float) -> None:
        entry = self.replicas.get(replica)
        if entry is not None:
            entry.image_work = max(0.0, entry.image_work - image_work)

    def mark_failed(self, replica: str) -> None:
        entry = self.replicas.get(replica)
        if entry is not None:
            entry.failed_at = self.clock()

    # ---- queries -----------------------------------------------------------------------------
    def alive(self) -> list[ReplicaEntry]:
        """Replicas that reported recently and have not failed since."""
        now = self.clock()
        expiry = self.cfg.state_expiry_s
        return [e for e in self.replicas.values() if now - e.seen <= expiry and e.seen > e.failed_at]
