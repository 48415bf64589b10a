"""Engine-replica side of the replica state: a thread that reports load and cache events.

Contract of `StateChannel` (all coroutines): `publish(report)` delivers one report to the hub and
returns its answer (`epoch`, `need_reset`); `poll(epoch, cursor)` returns the hub's view for a
router; `leave(replica)` drops a draining replica. They raise on a transport failure; callers
retry on their next tick (state is soft: a lost report is replaced by the next one, a lost event
stream by a snapshot). The publisher awaits them on its own thread's event loop: a Serve handle
whose router runs on the replica's loop (`serve_runtime.throughput_optimized`) can only be used
from inside a running loop, and a blocking wait on the replica's own loop would stall it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from maverick_serve.engine.base import ServingEngine
from maverick_serve.engine.cache_view import CacheView
from maverick_serve.routing.cost import block_key
from maverick_serve.routing.hub import ReplicaStateHub

logger = logging.getLogger(__name__)
# Drained every state interval; bounded so a stalled publisher costs at most ~20 MB. Events lost
# to the bound only make the router's view drift until the next snapshot (hub restart).
EVENTS_MAXLEN = 200_000


def stamped_load(engine: ServingEngine) -> dict[str, float]:
    """The engine's load report with `at`, this host's monotonic time of reading it. Reports reach
    routers two ways (the hub, and the first event of each stream the router sent): a router
    keeps the newest by `at`, and both ways start in the same replica process, so the stamps
    compare."""
    load = engine.load_report()
    load["at"] = time.monotonic()
    return load


class StateChannel(ABC):
    @abstractmethod
    async def publish(self, report: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    async def poll(self, epoch: str | None, cursor: int) -> dict[str, Any]: ...

    @abstractmethod
    async def leave(self, replica: str) -> None: ...


class LocalStateChannel(StateChannel):
    """An in-process hub (tests, benchmarks)."""

    def __init__(self, hub: ReplicaStateHub) -> None:
        self.hub = hub
        self.lock = threading.Lock()  # publishers run on their own threads

    async def publish(self, report: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return self.hub.publish(report)

    async def poll(self, epoch: str | None, cursor: int) -> dict[str, Any]:
        with self.lock:
            return self.hub.poll(epoch, cursor)

    async def leave(self, replica: str) -> None:
        with self.lock:
            self.hub.leave(replica)


class HandleStateChannel(StateChannel):
    """The hub as a Serve deployment."""

    def __init__(self, handle: Any, timeout_s: float = 2.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    async def publish(self, report: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await asyncio.wait_for(self.handle.publish.remote(report), self.timeout_s)
        return result

    async def poll(self, epoch: str | None, cursor: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.poll.remote(epoch, cursor)
        return result

    async def leave(self, replica: str) -> None:
        await asyncio.wait_for(self.handle.leave.remote(replica), self.timeout_s)


class StatePublisher:
    def __init__(
        self,
        replica: str,
        engine: ServingEngine,
        channel: StateChannel,
        interval_s: float,
        cache: CacheView | None = None,
    ) -> None:
        """`engine` gives the load; `cache`, the native engine's caches whose prefix-cache and tier
        events are reported (None: load only, so routers balance this replica by load alone)."""
        self.replica = replica
        self.engine = engine
        self.cache = cache
        self.channel = channel
        self.interval_s = interval_s
        self.events: deque[tuple[bool, bytes]] = (
            cache.cache_events(EVENTS_MAXLEN) if cache is not None else deque()
        )
        self.tier_events = cache.tier_events(EVENTS_MAXLEN) if cache is not None else None
        self.tier_shared = cache.tier_shared if cache is not None else True
        self.need_reset = True
        self.hub_epoch: str | None = None
        self.stop = threading.Event()
        self.leaving = False
        self.thread = threading.Thread(target=self._run, name="state-publisher", daemon=True)

    def start(self) -> StatePublisher:
        self.thread.start()
        return self

    def report(self) -> dict[str, Any]:
        stored: dict[int, None] = {}
        evicted: dict[int, None] = {}
        events = self.events
        for _ in range(len(events)):
            is_stored, h = events.popleft()
            key = block_key(h)
            if is_stored:
                evicted.pop(key, None)
                stored[key] = None
            else:
                stored.pop(key, None)
                evicted[key] = None
        tier: list[int] = []
        if self.tier_events is not None:
            tier = [block_key(self.tier_events.popleft()) for _ in range(len(self.tier_events))]
        reset = self.need_reset
        if reset:  # the full prefix cache instead of the events
            pool_keys = self.cache.cached_blocks() if self.cache is not None else []
            stored = dict.fromkeys(block_key(h) for h in pool_keys)
            evicted = {}
        return {
            "replica": self.replica,
            "reset": reset,
            "load": stamped_load(self.engine),
            "stored": list(stored),
            "evicted": list(evicted),
            "tier_stored": tier,
            "tier_shared": self.tier_shared,
        }

    async def publish_once(self) -> None:
        report = self.report()
        answer = await self.channel.publish(report)
        if report["reset"]:
            self.need_reset = False
        epoch = answer.get("epoch")
        if answer.get("need_reset") or (self.hub_epoch is not None and epoch != self.hub_epoch):
            self.need_reset = True  # the hub restarted or missed us: send a snapshot next
        self.hub_epoch = epoch

    def _run(self) -> None:
        asyncio.run(self._publish_loop())

    async def _publish_loop(self) -> None:
        failures = 0
        while not self.stop.is_set():
            await asyncio.sleep(self.interval_s)
            if self.stop.is_set():
                break
            try:
                await self.publish_once()
                failures = 0
            except Exception as exc:  # the hub restarting must not stop the engine
                self.need_reset = True
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("replica state publish failed (%d in a row): %r", failures, exc)
        if self.leaving:
            try:
                await self.channel.leave(self.replica)
            except Exception as exc:
                logger.warning("could not leave the replica state hub: %r", exc)

    def close(self) -> None:
        self.stop.set()

    def leave(self) -> None:
        """Stop publishing and tell the hub this replica is gone (best effort: the hub expires
        silent replicas anyway). The publisher thread sends it: a Serve handle must not be waited
        on from the replica's event loop, where destructors run."""
        self.leaving = True
        self.close()
        self.thread.join(timeout=self.interval_s + 3.0)
