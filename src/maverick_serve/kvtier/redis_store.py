"""Redis as the KV store: redis-py asyncio, one connection pool, pipelined multi-key commands.

URLs: `redis://[:password@]host:port/db`, `rediss://` for TLS, `unix:///path/redis.sock`. Works
under `maxmemory-policy allkeys-lru` (evicted keys are misses). Values larger than
`max_value_bytes` are not stored (Redis' own limit is 512 MB; big blocks also stall the server).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from maverick_serve.kvtier.store import KVStore, KVStoreError


class RedisKVStore(KVStore):
    def __init__(
        self,
        url: str,
        max_connections: int = 32,
        socket_timeout_s: float = 5.0,
        max_value_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.url = url
        self.max_value_bytes = max_value_bytes
        self.client = aioredis.Redis.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
            retry_on_timeout=False,
        )

    async def _run(self, what: str, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise KVStoreError(f"redis {what} failed ({self._where()}): {exc}") from exc

    def _where(self) -> str:
        # Never echo a password: keep scheme, host and port only.
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def exists_many(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        result = await self._run("EXISTS", pipe.execute())
        return [bool(v) for v in result]

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        result = await self._run("MGET", self.client.mget(keys))
        return list(result)

    async def put_many(self, items: list[tuple[str, bytes]], ttl_s: int | None) -> None:
        items = [(k, v) for k, v in items if len(v) <= self.max_value_bytes]
        if not items:
            return
        pipe = self.client.pipeline(transaction=False)
        for k, v in items:
            pipe.set(k, v, ex=ttl_s)
        await self._run("SET", pipe.execute())

    async def delete_many(self, keys: list[str]) -> None:
        if keys:
            await self._run("DEL", self.client.delete(*keys))

    async def ping(self) -> None:
        await self._run("PING", self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
