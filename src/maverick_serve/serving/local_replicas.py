"""In-process engine replicas behind the `EngineClient` seam: the router runs against them in
tests and benchmarks exactly as it runs against Serve handles on a cluster."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from maverick_serve.api.engine_client import EngineClient
from maverick_serve.serving.engine_server import EngineServer


class LocalEngineClient(EngineClient):
    def __init__(self, server: EngineServer) -> None:
        self.server = server

    async def stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        async for event in self.server.generate(item):
            yield event

    async def info(self) -> dict[str, Any]:
        return await self.server.info()

    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.server.prefill(item)


class LocalReplicaSet(EngineClient):
    """Several in-process engine replicas behind one client, following the router's ranking the
    way `RankedRequestRouter` does on Serve (first live replica of `item["route"]`, else round
    robin). For tests and `bench router`; `down` marks replicas that fail like a dead actor."""

    def __init__(self, servers: list[EngineServer]) -> None:
        self.servers = {s.replica: s for s in servers}
        self.down: set[str] = set()
        self.turn = 0

    def pick(self, item: dict[str, Any]) -> EngineServer:
        for name in item.get("route") or []:
            if name in self.servers:
                return self.servers[name]
        names = sorted(self.servers)
        self.turn += 1
        return self.servers[names[self.turn % len(names)]]

    async def stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        server = self.pick(item)
        if server.replica in self.down:
            raise ConnectionError(f"replica {server.replica} is dead")
        async for event in server.generate(item):
            if server.replica in self.down:
                raise ConnectionError(f"replica {server.replica} died mid-stream")
            yield event

    def kill(self, name: str) -> None:
        """Make a replica fail like a dead actor: its streams raise and it stops reporting."""
        self.down.add(name)
        publisher = self.servers[name].publisher
        if publisher is not None:
            publisher.close()

    async def info(self) -> dict[str, Any]:
        return await next(iter(self.servers.values())).info()

    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.pick(item).prefill(item)
