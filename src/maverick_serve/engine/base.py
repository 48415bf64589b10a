"""The engine seams: `Engine`, the step-driven core of the native backend, and `ServingEngine`,
what an engine replica calls on any backend.

Contract of `Engine`:
- `add_request` validates and enqueues; it raises `InvalidRequestError` (naming the field and
  the limit) before any compute for bad input, and never leaves a half-added request behind.
- `step` runs one scheduling + forward iteration and returns the deltas it produced. It is
  called from one thread only (the engine loop); `add_request`, `abort` and `stats` may be
  called from that same thread between steps. `engine.native.async_engine.AsyncEngine` serialises them.
- Every request ends with exactly one delta with `finished=True`, a `finish_reason`
  ('stop', 'length' or 'abort') and `usage`; after `abort` that delta comes from the next step.
- Same checkpoint, same prompt, same sampling params and seed ⇒ the same tokens, whatever else
  is batched alongside.
- `stats` is cheap and safe to call between steps (metrics, routing and autoscaling read it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.cache_view import CacheView
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


class ServingEngine(ABC):
    """An engine as an engine replica serves it: async streams, whatever the backend.

    Contract (every backend: `NativeServingEngine`, `VllmEngine`):
    - `generate` checks the request first (`InvalidRequestError` naming the field and the
      limit, the same checks on every backend: `engine.request_checks`), then streams deltas;
      exactly one has `finished=True`, with `finish_reason`, `usage` and `timing`. Closing or
      cancelling the iterator aborts the request and frees its KV blocks.
    - A dead engine never hangs a caller: in-flight and new `generate` calls raise
      `EngineDeadError`, and `error` says why (Serve's health check reads it).
    - `stats` is cheap; `load_report` is safe from any thread (the hub publisher's).
    - Greedy sampling gives the same tokens as the backend alone on the same checkpoint.
    - `shutdown` stops the engine and every process it started.
    """

    spec: ModelSpec
    max_model_len: int

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    @abstractmethod
    async def stats(self) -> EngineStats: ...

    @abstractmethod
    def load_report(self) -> dict[str, float]:
        """waiting, running, queued_prefill_tokens, free_kv_blocks, total_kv_blocks; where the
        engine measures them also max_num_seqs, prefill_tokens_per_s, step_s, finished_per_s and
        the decode step-time model step_base_s + step_per_seq_s × batch (`engine/step_rates.py`;
        admission control predicts queue waits from them; absent or 0 means not measured)."""

    @property
    @abstractmethod
    def error(self) -> BaseException | None:
        """Why the engine stopped, or None while it runs."""

    @abstractmethod
    def shutdown(self) -> None: ...

    def cache_view(self) -> CacheView | None:
        """The native engine's prefix cache and KV-tier connector as the replica reports them;
        None where the backend keeps them to itself (routers then balance by load alone)."""
        return None
