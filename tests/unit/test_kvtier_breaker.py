"""A stalled or dead KV store costs one timeout: the breaker opens on the first failure, lookups
are misses at once, stores are dropped, a background probe closes it when the store answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from maverick_serve.config.kvtier import BreakerConfig
from maverick_serve.kvtier.breaker import CircuitBreaker
from maverick_serve.kvtier.client import KVTierClient
from maverick_serve.kvtier.store import KVStoreError, MemoryKVStore, StoreValue


class StallingStore(MemoryKVStore):
    """A memory store that can hang (like a SIGSTOPped Redis) or refuse (like a dead one)."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.mode = "ok"  # ok | stall | down
        self.calls = 0

    async def _gate(self) -> None:
        self.calls += 1
        if self.mode == "stall":
            await asyncio.sleep(3600)
        if self.mode == "down":
            raise KVStoreError("connection refused")

    async def exists_many(self, keys: list[str]) -> list[bool]:
        await self._gate()
        return await super().exists_many(keys)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        await self._gate()
        return await super().get_many(keys)

    async def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None:
        await self._gate()
        await super().put_many(items, ttl_s)

    async def ping(self) -> None:
        await self._gate()


def _wait(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("mode", ["stall", "down"])
def test_one_timeout_then_misses_at_once_then_recovery(mode: str) -> None:
    store = StallingStore()
    cfg = BreakerConfig(lookup_timeout_s=0.3, backoff_s=0.2, max_backoff_s=0.4, probe_timeout_s=0.2)
    client = KVTierClient(store, None, 16, cfg)
    try:
        client.submit([("a", b"x" * 10)])
        client.flush()
        assert client.exists_many(["a"]) == [True]
        store.mode = mode
        started = time.perf_counter()
        assert client.exists_many(["a"]) == [False]  # the one call that pays (≤ the lookup timeout)
        first = time.perf_counter() - started
        assert first < 0.3 + 0.2
        assert client.breaker is not None and client.breaker.is_open
        started = time.perf_counter()
        for _ in range(200):  # every request while unhealthy: a miss without asking
            assert client.exists_many(["a"]) == [False]
            assert client.get_many(["a"]) == [None]
        assert (time.perf_counter() - started) / 400 < 0.001
        assert client.stats.breaker_skips >= 400 and client.stats.breaker_opens == 1
        client.submit([("b", b"y")])
        assert _wait(lambda: client.stats.dropped_stores >= 1)  # stores dropped, not queued behind a stall
        store.mode = "ok"
        # Requests keep asking (each allow() may start a due probe); a probe finds it healthy.
        assert _wait(lambda: client.breaker.allow())
        assert client.stats.breaker_closes == 1
        assert client.exists_many(["a"]) == [True]  # hits return
    finally:
        store.mode = "ok"
        client.close()


def test_probe_backoff_doubles_to_the_cap_and_probes_run_one_at_a_time() -> None:
    now = [0.0]
    answers: list[bool] = []
    changes: list[str] = []

    def probe() -> bool:
        answers.append(False)
        return False

    b = CircuitBreaker(1.0, 4.0, probe, changes.append, clock=lambda: now[0])
    assert b.allow()
    b.failure("timeout")
    b.failure("timeout again")  # already open: one state change, logged once
    assert changes == ["open"]
    waits = []
    last = 0.0
    for t in [x * 0.5 for x in range(1, 40)]:
        now[0] = t
        before = len(answers)
        assert not b.allow()
        _wait(lambda: not b._probing, 1.0)
        if len(answers) > before:
            waits.append(t - last)
            last = t
    assert waits[:4] == [1.0, 2.0, 4.0, 4.0]  # first after backoff_s, then doubling, capped


def test_breaker_off_keeps_the_old_behaviour() -> None:
    store = StallingStore()
    client = KVTierClient(store, None, 16, BreakerConfig(enabled=False))
    try:
        store.mode = "down"
        assert client.exists_many(["a"]) == [False]
        assert client.exists_many(["a"]) == [False]
        assert store.calls == 2 and client.breaker is None and client.stats.errors == 2
    finally:
        client.close()
