"""The native engine as a `ServingEngine`: `NativeEngine` stepped by an `AsyncEngine` thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from maverick_serve.engine.base import ServingEngine
from maverick_serve.engine.native.async_engine import AsyncEngine
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, EngineStats, RequestOutput


class NativeServingEngine(ServingEngine):
    def __init__(
        self,
        engine: NativeEngine,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_interval_s: float = 1.0,
    ) -> None:
        self.native = engine  # the KV cache, tier connector and cache events live here
        self.spec = engine.spec
        self.max_model_len = engine.max_model_len
        self.runner = AsyncEngine(engine, on_stats=on_stats, stats_interval_s=stats_interval_s)

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        return self.runner.generate(request)

    async def stats(self) -> EngineStats:
        return await self.runner.stats()

    def load_report(self) -> dict[str, float]:
        return self.native.load_report()

    @property
    def error(self) -> BaseException | None:
        return self.runner.error

    def shutdown(self) -> None:
        self.runner.shutdown(timeout_s=1.0)
