"""The bulk-bytes seam of the KV tier: which wire moves block values.

The Redis store always keeps the index (which keys exist, their TTL, LRU eviction); the value
bytes go through a `BulkTransport`:
- `redis` (default): the same Redis, through `RespPool` (scatter-gather writes, reads straight
  into the value buffer);
- `mooncake` (optional, GPU clusters): Mooncake's distributed store over RDMA
  (`kvtier/mooncake_transport.py`); Redis then keeps a small marker per key.

Contract of `BulkTransport` (blocking calls, made from the store's thread pool, so an
implementation must be thread-safe):
- `put_many(items, ttl_s)` stores every value or raises; `get_many(keys)` answers per key, `None`
  for a missing or evicted value (a miss, never an error); `delete_many(keys)` is idempotent;
- `holds_index` says whether `put_many` already made the keys visible to `exists` on the index
  (true when the transport *is* Redis; otherwise the store writes markers after `put_many`);
- any failure of the wire (unreachable, auth, TLS, timeout) raises `KVStoreError`.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod

from maverick_serve.kvtier.resp import RespError, RespPool, resp_command, resp_set
from maverick_serve.kvtier.store import KVStoreError, StoreValue


class BulkTransport(ABC):
    holds_index: bool = False

    @abstractmethod
    def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None: ...

    @abstractmethod
    def get_many(self, keys: list[str]) -> list[bytes | bytearray | None]: ...

    @abstractmethod
    def delete_many(self, keys: list[str]) -> None: ...

    def ping(self) -> None:  # noqa: B027 - optional
        """Raise `KVStoreError` when the wire is unusable (checked at start when required)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and registered memory."""


def where(url: str) -> str:
    """The URL without credentials, for error messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class RedisBulkTransport(BulkTransport):
    holds_index = True

    def __init__(self, url: str, max_connections: int, timeout_s: float) -> None:
        self.url = url
        self.pool = RespPool(url, max_connections, timeout_s)

    def _pipeline(self, what: str, commands: list[list[bytes | memoryview]]) -> list[object]:
        try:
            with self.pool.connection() as conn:
                conn.send(commands)
                replies: list[object] = []
                for _ in commands:  # read every reply, even after an error, to stay in sync
                    try:
                        replies.append(conn.read_reply())
                    except RespError as exc:
                        replies.append(exc)
        except (OSError, ConnectionError, queue.Full) as exc:
            raise KVStoreError(
                f"redis {what} failed ({where(self.url)}): {exc or type(exc).__name__}"
            ) from exc
        except RespError as exc:  # AUTH or SELECT refused while connecting
            raise KVStoreError(f"redis {what} failed ({where(self.url)}): {exc}") from exc
        errors = [r for r in replies if isinstance(r, RespError)]
        if errors:
            raise KVStoreError(f"redis {what} failed ({where(self.url)}): {errors[0]}")
        return replies

    def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None:
        self._pipeline(
            "SET", [resp_set(k.encode(), (v,) if isinstance(v, bytes) else v, ttl_s) for k, v in items]
        )

    def get_many(self, keys: list[str]) -> list[bytes | bytearray | None]:
        replies = self._pipeline("GET", [resp_command(b"GET", k.encode()) for k in keys])
        return [r if isinstance(r, bytes | bytearray) else None for r in replies]

    def delete_many(self, keys: list[str]) -> None:
        if keys:
            self._pipeline("DEL", [resp_command(b"DEL", *(k.encode() for k in keys))])

    def ping(self) -> None:
        self._pipeline("PING", [resp_command(b"PING")])

    def close(self) -> None:
        self.pool.close()
