"""How the router reaches engine replicas: a small seam so the router runs the same against a
Serve deployment handle (the cluster) or in-process engine servers (`serving.local_replicas`:
tests, benchmarks)."""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import Any

from ray.serve import context as serve_context
from ray.serve._private.utils import generate_request_id


class EngineClient(ABC):
    """Contract: `stream` yields the replica's events (output deltas or one error event) and
    stops after the finished delta; closing the iterator early aborts the engine request."""

    @abstractmethod
    def stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]: ...

    @abstractmethod
    async def info(self) -> dict[str, Any]: ...

    @abstractmethod
    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]: ...


class HandleEngineClient(EngineClient):
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        gen = contextvars.copy_context().run(self._start_stream, item)
        try:
            async for event in gen:
                yield event
        finally:
            gen.cancel()  # no-op when finished; aborts the engine request when the client left

    def _start_stream(self, item: dict[str, Any]) -> Any:
        """The call under an internal request id of its own (in a copied context, so the caller's
        is untouched). Serve gives a handle call its ingress request's id, and its request router
        pairs a chosen replica with the pending call by that id: the n calls of one request with
        n > 1 then shared one id, one of them was never paired, and the router's routing task
        spun on it at full CPU without yielding (ray 2.60, request_router.py
        `_fulfill_next_pending_request`)."""
        serve_context._set_request_context(_internal_request_id=generate_request_id())
        return self.handle.options(stream=True).generate.remote(item)

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.info.remote()
        return result

    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.prefill.remote(item)
        return result
