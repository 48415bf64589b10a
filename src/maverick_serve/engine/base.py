"""The engine seam: what the serving layer may call on any engine backend.

Contract (every backend):
- `add_request` validates and enqueues; it raises `InvalidRequestError` (naming the field and
  the limit) before any compute for bad input, and never leaves a half-added request behind.
- `step` runs one scheduling + forward iteration and returns the deltas it produced. It is
  called from one thread only (the engine loop); `add_request`, `abort` and `stats` may be
  called from that same thread between steps. `AsyncEngine` below serialises them for you.
- Every request ends with exactly one delta with `finished=True`, a `finish_reason`
  ('stop', 'length' or 'abort') and `usage`; after `abort` that delta comes from the next step.
- Same checkpoint, same prompt, same sampling params and seed ⇒ the same tokens, whatever else
  is batched alongside.
- `stats` is cheap and safe to call between steps (metrics, routing and autoscaling read it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from maverick_serve.engine.types import EngineRequest, EngineStats, RequestOutput


class Engine(ABC):
    @abstractmethod
    def add_request(self, request: EngineRequest) -> None: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def step(self) -> list[RequestOutput]: ...

    @abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...
