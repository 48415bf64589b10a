"""The KV store seam and its embedded implementation.

Contract of `KVStore` (all methods are coroutines, called from the tier's I/O event loop only):
- `exists_many(keys)` and `get_many(keys)` answer per key in one round trip; a missing or evicted
  key is `False` / `None` (a miss, not an error);
- `put_many(items, ttl_s)` stores all pairs (best effort; may evict others under memory limits); a
  value is bytes or parts to be stored back to back (`StoreValue`);
- `delete_many(keys)` removes keys (used for values that fail their checksum);
- any other failure (store down, auth, TLS) raises `KVStoreError`; the tier counts it and treats
  the request as a miss, so losing the store costs time, never a wrong answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict

StoreValue = bytes | tuple[bytes, memoryview]  # one buffer, or a header and a payload view


def value_nbytes(value: StoreValue) -> int:
    return len(value) if isinstance(value, bytes) else sum(memoryview(p).nbytes for p in value)


def value_bytes(value: StoreValue) -> bytes:
    return value if isinstance(value, bytes) else b"".join(value)


class KVStoreError(RuntimeError):
    """The store is unreachable or refused the operation."""


class KVStore(ABC):
    @abstractmethod
    async def exists_many(self, keys: list[str]) -> list[bool]: ...

    @abstractmethod
    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    @abstractmethod
    async def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None: ...

    @abstractmethod
    async def delete_many(self, keys: list[str]) -> None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class MemoryKVStore(KVStore):
    """Bounded in-process LRU (the embedded default). TTLs are ignored: capacity evicts."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.data: OrderedDict[str, bytes] = OrderedDict()

    async def exists_many(self, keys: list[str]) -> list[bool]:
        return [k in self.data for k in keys]

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        out = []
        for k in keys:
            v = self.data.get(k)
            if v is not None:
                self.data.move_to_end(k)
            out.append(v)
        return out

    async def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None:
        for k, value in items:
            v = value_bytes(value)
            if len(v) > self.capacity:
                continue
            old = self.data.pop(k, None)
            if old is not None:
                self.used -= len(old)
            self.data[k] = v
            self.used += len(v)
            while self.used > self.capacity:
                _, evicted = self.data.popitem(last=False)
                self.used -= len(evicted)

    async def delete_many(self, keys: list[str]) -> None:
        for k in keys:
            v = self.data.pop(k, None)
            if v is not None:
                self.used -= len(v)

    async def ping(self) -> None:
        return None
