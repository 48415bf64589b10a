"""The bulk-bytes transport against a real redis-server (the Mooncake backend's test is in
test_kvtier_redis.py, beside the engine helpers it shares)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import torch

from maverick_serve.kvtier.redis_store import RedisKVStore
from maverick_serve.kvtier.store import KVStoreError
from maverick_serve.kvtier.transport import RedisBulkTransport


def test_large_values_round_trip_in_pipelines(redis_server: Any) -> None:
    transport = RedisBulkTransport(redis_server.url, 2, 5.0)
    values = {f"t:{i}": os.urandom(300_000 + i) for i in range(20)}
    transport.put_many(list(values.items()), ttl_s=60)
    got = transport.get_many([*values, "t:missing"])
    assert [bytes(v) for v in got[:-1] if v is not None] == list(values.values()) and got[-1] is None
    assert 0 < redis_server.client().ttl("t:0") <= 60
    transport.delete_many(list(values))
    assert transport.get_many(["t:0"]) == [None]


def test_error_reply_keeps_the_connection_in_sync(redis_server: Any) -> None:
    transport = RedisBulkTransport(redis_server.url, 1, 5.0)  # one connection: it must survive
    redis_server.client().rpush("t:list", "x")
    transport.put_many([("t:a", b"A" * 100_000)], None)
    with pytest.raises(KVStoreError, match="WRONGTYPE"):
        transport.get_many(["t:a", "t:list", "t:a"])
    assert [bytes(v or b"") for v in transport.get_many(["t:a"])] == [b"A" * 100_000]


def test_reconnects_after_a_restart(redis_server: Any) -> None:
    transport = RedisBulkTransport(redis_server.url, 1, 1.0)
    transport.put_many([("t:a", b"1")], None)
    redis_server.stop()
    with pytest.raises(KVStoreError, match=r"redis GET failed \(redis://127\.0\.0\.1"):
        transport.get_many(["t:a"])
    redis_server.start()
    assert transport.get_many(["t:a"]) == [None]  # a fresh, empty server; no error


def test_wrong_password_names_the_server_not_the_secret(redis_with_password: Any) -> None:
    transport = RedisBulkTransport(redis_with_password.url.replace("s3cret", "wrong"), 1, 1.0)
    with pytest.raises(KVStoreError) as info:
        transport.ping()
    assert "WRONGPASS" in str(info.value) or "invalid" in str(info.value)
    assert "wrong" not in str(info.value).replace("WRONGPASS", "")


def test_store_over_redis_index_plus_bulk(redis_server: Any) -> None:
    async def scenario() -> tuple[list[bool], list[Any]]:
        store = RedisKVStore(redis_server.url, max_value_bytes=200_000)
        await store.put_many([("s:a", b"a" * 1000), ("s:big", b"b" * 300_000)], ttl_s=None)
        present = await store.exists_many(["s:a", "s:big"])
        values = await store.get_many(["s:a", "s:big"])
        await store.close()
        return present, values

    present, values = asyncio.run(scenario())
    assert present == [True, False]  # above max_value_bytes: not stored
    assert values[0] == b"a" * 1000 and values[1] is None


def test_bench_throughput_lines_compare_with_redis_benchmark(redis_server: Any) -> None:
    from maverick_serve.bench.kvtier_bench import throughput_lines
    from maverick_serve.config import preset

    lines = throughput_lines(
        redis_server.url, redis_server.port, preset("tiny"), 32, 512, torch.bfloat16, "(x)"
    )
    # 2 layers × (K, V) × 32 tokens × 2 KV heads × 64 × 2 bytes + a 61-byte header
    assert lines[0].startswith("(x) block values of 32,829 B (32 tokens × 2 global layers, bfloat16)")
    assert "vs redis-benchmark SET" in lines[1] and "vs redis-benchmark GET" in lines[2]
    assert "wire alone" in lines[3]
