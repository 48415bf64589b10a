"""Where engine replicas publish their state and router replicas read it.

`ReplicaStateHub` is a plain class run as a one-replica Serve deployment (or in-process in tests
and benchmarks); its methods are fast and synchronous, so they run one at a time on the replica.
Replicas `publish` a report every `routing.state_interval_s`: their load and the cache events
since the last report (block keys stored and evicted; KV-tier blocks stored). The
first report of a replica process, or any report after the hub restarted, is a full snapshot
(`reset`). Routers `poll(epoch, cursor)` on the same period and get the events after their cursor
and everybody's latest load; a router that is new, fell behind the bounded log, or saw the hub
restart gets a snapshot instead. Replicas silent for `expiry_s` are dropped.

Everything crossing the process boundary is plain lists, ints and strings (no pickle of ours).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Replica:
    load: dict[str, float]
    seen: float
    tier_shared: bool
    stored: set[int] = field(default_factory=set)
    tier_stored: set[int] = field(default_factory=set)


class ReplicaStateHub:
    def __init__(
        self, max_log: int = 4096, expiry_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.log: deque[tuple[int, dict[str, Any]]] = deque(maxlen=max_log)
        self.replicas: dict[str, _Replica] = {}
        self.expiry_s = expiry_s
        self.clock = clock

    def publish(self, report: dict[str, Any]) -> dict[str, Any]:
        """Returns the hub's epoch: a replica that sees it change sends a snapshot next."""
        self._expire()
        name = str(report["replica"])
        state = self.replicas.get(name)
        reset = bool(report.get("reset"))
        if state is None and not reset:
            return {"epoch": self.epoch, "need_reset": True}  # missed its snapshot: ask again
        if state is None or reset:  # a snapshot replaces whatever the hub knew
            state = self.replicas[name] = _Replica({}, 0.0, True)
        state.load = {k: float(v) for k, v in report.get("load", {}).items()}
        state.seen = self.clock()
        state.tier_shared = bool(report.get("tier_shared", True))
        stored = [int(k) for k in report.get("stored", ())]
        evicted = [int(k) for k in report.get("evicted", ())]
        tier_stored = [int(k) for k in report.get("tier_stored", ())]
        state.stored.difference_update(evicted)
        state.stored.update(stored)
        state.tier_stored.update(tier_stored)
        if reset or stored or evicted or tier_stored:
            self.seq += 1
            event = {
                "replica": name,
                "reset": reset,
                "stored": stored,
                "evicted": evicted,
                "tier_stored": tier_stored,
                "tier_shared": state.tier_shared,
            }
            self.log.append((self.seq, event))
        return {"epoch": self.epoch, "need_reset": False}

    def leave(self, replica: str) -> dict[str, Any]:
        """A replica stopping on purpose (scale-down, upgrade): routers drop it and its cache
        entries on their next poll instead of after `expiry_s`."""
        self.replicas.pop(str(replica), None)  # routers forget replicas missing from `poll`
        return {"epoch": self.epoch, "need_reset": False}

    def poll(self, epoch: str | None, cursor: int) -> dict[str, Any]:
        self._expire()
        now = self.clock()
        loads = {
            name: {"load": s.load, "age": now - s.seen, "tier_shared": s.tier_shared}
            for name, s in self.replicas.items()
        }
        oldest = self.log[0][0] if self.log else self.seq + 1
        if epoch != self.epoch or cursor + 1 < oldest or cursor > self.seq:
            events = [
                {
                    "replica": name,
                    "reset": True,
                    "stored": list(s.stored),
                    "evicted": [],
                    "tier_stored": list(s.tier_stored),
                    "tier_shared": s.tier_shared,
                }
                for name, s in self.replicas.items()
            ]
            snapshot = True
        else:
            events = [e for seq, e in self.log if seq > cursor]
            snapshot = False
        return {
            "epoch": self.epoch,
            "cursor": self.seq,
            "snapshot": snapshot,
            "events": events,
            "replicas": loads,
        }

    def _expire(self) -> None:
        now = self.clock()
        for name in [n for n, s in self.replicas.items() if now - s.seen > self.expiry_s]:
            del self.replicas[name]
