"""`router.colocated`: the router and one engine in the same replica (the LlamaEngine deployment is
the HTTP ingress). A request goes from the router's HTTP handler to its engine by a method call,
not a Ray handle call: on a host with one engine replica that is the whole Ray hop (its
serialization, the actor call and the per-chunk stream objects) off every request.

Each replica routes to its own engine only; across replicas Serve's ingress picks by queue length.
The replica reports its engine's load (the engine tier's policy) and its router's long-prompt
demand (the prefill tier's policy) in one set of autoscaling stats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.routing.hub import ReplicaStateHub
from maverick_serve.routing.publisher import LocalStateChannel
from maverick_serve.serving.engine_server import EngineServer
from maverick_serve.serving.local_replicas import LocalEngineClient
from maverick_serve.serving.router_server import RouterServer


class ColocatedServer(RouterServer):
    def __init__(self, config: dict[str, Any], prefill: Any = None) -> None:
        cfg = ClusterConfig.model_validate(config)
        # The router's cache view holds this replica's engine alone: an in-process hub.
        channel = LocalStateChannel(ReplicaStateHub(expiry_s=cfg.router.routing.hub_expiry_s()))
        self.engine_server = EngineServer(config, channel)
        super().__init__(config, LocalEngineClient(self.engine_server), prefill, channel)

    # The engine deployment's own methods, so handle callers (prefill hand-offs aside, tools such
    # as `bench serve`'s handle baseline) reach the engine as on a separate LlamaEngine replica.
    async def generate(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for event in self.engine_server.generate(item):
            yield event

    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.engine_server.prefill(item)

    async def stats(self) -> dict[str, Any]:
        return await self.engine_server.stats()

    async def info(self) -> dict[str, Any]:
        return await self.engine_server.info()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's stats, with prefill_tokens_per_s the router's demand (what the prefill
        tier scales on) rather than what this engine prefilled itself."""
        return {**self.engine_server.record_autoscaling_stats(), **super().record_autoscaling_stats()}

    def check_health(self) -> None:
        self.engine_server.check_health()

    def shutdown(self) -> None:
        self.dispatcher.close()
        self.engine_server.shutdown()
