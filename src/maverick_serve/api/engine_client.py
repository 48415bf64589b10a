"""How the router reaches engine replicas: a small seam so the router runs the same against a
Serve deployment handle (the cluster) or in-process engine servers (`serving.local_replicas`:
tests, benchmarks)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import Any


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
        gen = self.handle.options(stream=True).generate.remote(item)
        try:
            async for event in gen:
                yield event
        finally:
            gen.cancel()  # no-op when finished; aborts the engine request when the client left

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.info.remote()
        return result

    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.prefill.remote(item)
        return result
