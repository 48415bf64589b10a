"""Redis as the KV store: the index on redis-py's asyncio client, the value bytes on a
`BulkTransport` (by default the same Redis through our RESP bulk client).

URLs: `redis://[:password@]host:port/db`, `rediss://` for TLS, `unix:///path/redis.sock`. Works
under `maxmemory-policy allkeys-lru` (evicted keys are misses). Values larger than
`max_value_bytes` are not stored (Redis' own limit is 512 MB; big blocks also stall the server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from maverick_serve.config.kvtier import BulkConfig, RedisBulkConfig
from maverick_serve.kvtier.store import KVStore, KVStoreError, StoreValue, value_nbytes
from maverick_serve.kvtier.transport import BulkTransport, RedisBulkTransport, where

T = TypeVar("T")
MARKER = b"1"  # the index value of a key whose bytes live on another transport


def make_transport(bulk: BulkConfig, url: str, max_connections: int, timeout_s: float) -> BulkTransport:
    if bulk.type == "mooncake":
        from maverick_serve.kvtier.mooncake_transport import MooncakeBulkTransport

        return MooncakeBulkTransport(bulk)
    return RedisBulkTransport(url, max_connections, timeout_s)


class RedisKVStore(KVStore):
    def __init__(
        self,
        url: str,
        max_connections: int = 32,
        socket_timeout_s: float = 5.0,
        max_value_bytes: int = 256 * 1024 * 1024,
        bulk: BulkConfig | None = None,
    ) -> None:
        self.url = url
        self.max_value_bytes = max_value_bytes
        self.index = aioredis.Redis.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        self.transport = make_transport(bulk or RedisBulkConfig(), url, max_connections, socket_timeout_s)
        self.pool = ThreadPoolExecutor(max_workers=min(8, max_connections), thread_name_prefix="kvtier-bulk")

    async def _index(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            raise KVStoreError(f"redis {what} failed ({where(self.url)}): {exc}") from exc

    async def _bulk(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def exists_many(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []

        async def run() -> list[Any]:
            pipe = self.index.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            return await pipe.execute()

        return [bool(v) for v in await self._index("EXISTS", run)]

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self.transport.holds_index:
            values = await self._bulk(lambda: self.transport.get_many(keys))
        else:
            marked = await self._index("MGET", lambda: self.index.mget(keys))
            wanted = [k for k, m in zip(keys, marked, strict=True) if m is not None]
            found = dict(zip(wanted, await self._bulk(lambda: self.transport.get_many(wanted)), strict=True))
            values = [found.get(k) for k in keys]
        # bytearray from the bulk client: the codec only reads it, so no copy to bytes.
        return values  # type: ignore[return-value]

    async def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None:
        items = [(k, v) for k, v in items if value_nbytes(v) <= self.max_value_bytes]
        if not items:
            return
        await self._bulk(lambda: self.transport.put_many(items, ttl_s))
        if not self.transport.holds_index:

            async def mark() -> Any:
                pipe = self.index.pipeline(transaction=False)
                for k, _ in items:
                    pipe.set(k, MARKER, ex=ttl_s)
                return await pipe.execute()

            await self._index("SET", mark)

    async def delete_many(self, keys: list[str]) -> None:
        if keys:
            await self._index("DEL", lambda: self.index.delete(*keys))
            if not self.transport.holds_index:
                await self._bulk(lambda: self.transport.delete_many(keys))

    async def ping(self) -> None:
        await self._index("PING", self.index.ping)
        await self._bulk(self.transport.ping)  # the bulk wire authenticates on its own

    async def close(self) -> None:
        await self.index.aclose()
        self.transport.close()
        self.pool.shutdown(wait=False)
