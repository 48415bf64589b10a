"""The router, N engine replicas and the state hub in one process, talking the same protocol as
on Serve (replica reports, hub polls, ranked routing). Used by tests and `bench router`."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.routing.hub import ReplicaStateHub
from maverick_serve.routing.publisher import LocalStateChannel
from maverick_serve.serving.engine_server import EngineServer
from maverick_serve.serving.local_replicas import LocalReplicaSet
from maverick_serve.serving.router_server import RouterServer


class InProcessCluster:
    def __init__(self, config: dict[str, Any], replicas: int) -> None:
        cfg = ClusterConfig.model_validate(config)
        self.payload = cfg.model_dump(mode="json")
        self.hub = ReplicaStateHub(expiry_s=cfg.router.routing.hub_expiry_s())
        self.channel = LocalStateChannel(self.hub)
        self.servers = [EngineServer(self.payload, self.channel, f"replica-{i}") for i in range(replicas)]
        self.replicas = LocalReplicaSet(self.servers)
        self.router = RouterServer(self.payload, self.replicas, hub=self.channel)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.router.build_api()), base_url="http://router", timeout=600
        )

    async def wait_for_state(self, timeout_s: float = 5.0) -> None:
        """Until the router sees every replica (their first reports went through the hub)."""
        await self.router.dispatcher.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.router.dispatcher.view.alive()) < len(self.servers):
            if loop.time() > deadline:
                raise TimeoutError("engine replicas did not report to the state hub")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.client.aclose()
        self.router.dispatcher.close()
        for s in self.servers:
            if s.publisher is not None:
                s.publisher.close()
            s.shutdown()
