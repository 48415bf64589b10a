"""The native engine as a `ServingEngine`: `NativeEngine` stepped by an `AsyncEngine` thread."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable

from maverick_serve.engine.base import ServingEngine
from maverick_serve.engine.cache_view import CacheView
from maverick_serve.engine.native.async_engine import AsyncEngine
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, EngineStats, RequestOutput
from maverick_serve.model.attention import GLOBAL_GROUP


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
        self._cache_view = LocalCacheView(engine)

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
        if self.native.expert_tier is not None:
            self.native.expert_tier.release()  # a group that follows the engines may stop now

    def cache_view(self) -> CacheView:
        return self._cache_view


class LocalCacheView(CacheView):
    """The caches of an engine in this process: the deques are the engine's own."""

    def __init__(self, engine: NativeEngine) -> None:
        self.engine = engine
        connector = engine.kv_connector
        self.has_tier = connector is not None
        self.tier_shared = connector.shared if connector is not None else True

    def cache_events(self, maxlen: int) -> deque[tuple[bool, bytes]]:
        return self.engine.kv.enable_cache_events(maxlen)

    def tier_events(self, maxlen: int) -> deque[bytes] | None:
        connector = self.engine.kv_connector
        if connector is None:
            return None
        if connector.tier_events is None:
            connector.tier_events = deque(maxlen=maxlen)
        return connector.tier_events

    def cached_blocks(self) -> list[bytes]:
        return list(self.engine.kv.pools[GLOBAL_GROUP].cached)

    def flush_tier(self, timeout_s: float) -> None:
        if self.engine.kv_connector is not None:
            self.engine.kv_connector.flush(timeout_s)
