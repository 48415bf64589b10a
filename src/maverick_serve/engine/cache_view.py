"""The seam between a native engine's caches and the replica around it, wherever the engine
runs (a thread of the replica, or its own process: `serving.engine_process`).

Contract of `CacheView`:
- `cache_events(maxlen)` starts recording the global-group blocks stored in and evicted from the
  prefix cache (the blocks a router can match a prompt against) and returns the deque they land
  in as (stored, block hash), oldest first; the publisher thread drains it. Calling it again
  returns the same deque.
- `tier_events(maxlen)`, likewise for the block hashes queued for storing in the KV tier; None
  without a tier. `tier_shared` says whether every replica reads that tier (a Redis store).
- `cached_blocks()` is the whole prefix cache now (a snapshot, for a hub that lost the events).
- `flush_tier(timeout_s)` returns once the tier stores queued so far have landed (the prefill
  role's hand-off), blocking its caller and not the engine loop; `has_tier` says whether there
  is a tier to flush.
All of them are safe to call from any thread but the engine loop's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque


class CacheView(ABC):
    has_tier: bool
    tier_shared: bool

    @abstractmethod
    def cache_events(self, maxlen: int) -> deque[tuple[bool, bytes]]: ...

    @abstractmethod
    def tier_events(self, maxlen: int) -> deque[bytes] | None: ...

    @abstractmethod
    def cached_blocks(self) -> list[bytes]: ...

    @abstractmethod
    def flush_tier(self, timeout_s: float) -> None: ...
