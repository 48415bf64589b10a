"""The engine's handle on the store: an asyncio I/O thread, sync calls for the engine thread,
a bounded write-behind queue, counters, and the outage policy (errors are misses; after one
failure or timeout the circuit breaker skips the store until a background probe answers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from maverick_serve.config.kvtier import BreakerConfig
from maverick_serve.kvtier.breaker import CircuitBreaker
from maverick_serve.kvtier.store import KVStore, KVStoreError, StoreValue, value_nbytes

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Deadline of every call when the breaker is off (the client's behaviour before it existed).
UNGUARDED_TIMEOUT_S = 10.0
PendingStore = tuple[str, StoreValue | Callable[[], StoreValue]]  # a payload or its deferred encoder


@dataclass
class TierStats:
    hit_tokens: int = 0
    miss_tokens: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    blocks_stored: int = 0
    dropped_stores: int = 0
    checksum_failures: int = 0
    errors: int = 0
    breaker_opens: int = 0  # the store turned unhealthy
    breaker_closes: int = 0  # a probe found it healthy again
    breaker_skips: int = 0  # lookups answered "miss" without asking it


class KVTierClient:
    def __init__(
        self,
        store: KVStore,
        ttl_s: int | None,
        queue_blocks: int,
        breaker: BreakerConfig | None = None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        cfg = breaker or BreakerConfig(enabled=False)
        self.lookup_timeout_s = cfg.lookup_timeout_s if cfg.enabled else UNGUARDED_TIMEOUT_S
        self.store_timeout_s = cfg.store_timeout_s if cfg.enabled else UNGUARDED_TIMEOUT_S
        self.probe_timeout_s = cfg.probe_timeout_s
        self.stats = TierStats()
        self.breaker: CircuitBreaker | None = None
        if cfg.enabled:
            self.breaker = CircuitBreaker(
                cfg.backoff_s, cfg.max_backoff_s, self._probe, self._breaker_changed
            )
        self.loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self.loop.run_forever, name="kvtier-io", daemon=True)
        self._io.start()
        self._writes: queue.Queue[list[PendingStore] | None] = queue.Queue(maxsize=queue_blocks)
        self._writer = threading.Thread(target=self._write_loop, name="kvtier-writer", daemon=True)
        self._writer.start()

    def _call(self, fn: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        async def run() -> T:
            return await fn()

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()  # a stalled store must not pile up calls on the I/O loop
            raise TimeoutError(f"KV tier call exceeded {timeout_s:g} s") from None

    def ping(self) -> None:
        """Raises KVStoreError when the store is unreachable (used by `kvtier.required`)."""
        self._call(self.store.ping, self.store_timeout_s)

    def _probe(self) -> bool:
        try:
            self._call(self.store.ping, self.probe_timeout_s)
            return True
        except (KVStoreError, TimeoutError):
            return False

    def _breaker_changed(self, state: str) -> None:
        if state == "open":
            self.stats.breaker_opens += 1
        else:
            self.stats.breaker_closes += 1

    def _skip(self) -> bool:
        if self.breaker is not None and not self.breaker.allow():
            self.stats.breaker_skips += 1
            return True
        return False

    def _failed(self, exc: BaseException) -> None:
        self._error(exc)
        if self.breaker is not None:
            self.breaker.failure(exc)

    def exists_many(self, keys: list[str]) -> list[bool]:
        if self._skip():
            return [False] * len(keys)
        try:
            return self._call(lambda: self.store.exists_many(keys), self.lookup_timeout_s)
        except (KVStoreError, TimeoutError) as exc:
            self._failed(exc)
            return [False] * len(keys)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        if self._skip():
            return [None] * len(keys)
        start = time.perf_counter()
        try:
            values = self._call(lambda: self.store.get_many(keys), self.lookup_timeout_s)
        except (KVStoreError, TimeoutError) as exc:
            self._failed(exc)
            return [None] * len(keys)
        self.stats.load_seconds += time.perf_counter() - start
        self.stats.bytes_in += sum(len(v) for v in values if v is not None)
        return values

    def delete_many(self, keys: list[str]) -> None:
        if self._skip():
            return
        try:
            self._call(lambda: self.store.delete_many(keys), self.lookup_timeout_s)
        except (KVStoreError, TimeoutError) as exc:
            self._failed(exc)

    def submit(self, items: list[PendingStore]) -> bool:
        """Queue blocks for storing; under overload drop them (never stall the engine). A payload
        may be a callable, encoded on the writer thread instead of the caller's."""
        try:
            self._writes.put_nowait(items)
            return True
        except queue.Full:
            self.stats.dropped_stores += len(items)
            return False

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until queued stores are written (tests, handing a prefill to a decode replica)."""
        deadline = time.monotonic() + timeout_s
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _write_loop(self) -> None:
        while True:
            pending = self._writes.get()
            try:
                if pending is None:
                    return
                if self.breaker is not None and not self.breaker.allow():  # unhealthy: drop, not wait
                    self.stats.dropped_stores += len(pending)
                    continue
                items = [(k, v() if callable(v) else v) for k, v in pending]
                start = time.perf_counter()
                self._call(
                    lambda items=items: self.store.put_many(items, self.ttl_s),  # type: ignore[misc]
                    self.store_timeout_s,
                )
                self.stats.store_seconds += time.perf_counter() - start
                self.stats.blocks_stored += len(items)
                self.stats.bytes_out += sum(value_nbytes(v) for _, v in items)
            except (KVStoreError, TimeoutError) as exc:
                self._failed(exc)
            except Exception:  # a store bug must not kill the writer
                logger.exception("KV tier store failed")
                self.stats.errors += 1
            finally:
                self._writes.task_done()

    def _error(self, exc: BaseException) -> None:
        self.stats.errors += 1
        if self.stats.errors in (1, 10, 100) or self.stats.errors % 1000 == 0:
            logger.warning("KV tier unavailable (%d errors so far): %s", self.stats.errors, exc)

    def close(self) -> None:
        self._writes.put(None)
        self._writer.join(timeout=5)
        closing: Any = asyncio.run_coroutine_threadsafe(self.store.close(), self.loop)
        with contextlib.suppress(Exception):  # closing a dead connection may fail; nothing to do
            closing.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
