"""The KV tier over a real redis-server: reuse across replicas, corruption, fingerprints, outages."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from maverick_serve.config import NativeEngineConfig, preset
from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.model.make_model import make_model
from maverick_serve.serving.engine_factory import load_native_engine

ENGINE = NativeEngineConfig(kv_cache_memory_gib=0.05, max_num_batched_tokens=128)
PROMPT = torch.randint(0, 1900, (250,), generator=torch.Generator().manual_seed(0)).tolist()


REDIS_BULK = {"type": "redis"}


def _tier(url: str, bulk: dict[str, Any] | None = None, **kw: Any) -> KVTierConfig:
    # Tier blocks of 32 tokens (two per 64-token attention chunk) so prompts of a few hundred
    # tokens store both layer groups: NoPE blocks everywhere, RoPE blocks of the final chunk.
    return KVTierConfig.model_validate(
        {
            "store": {
                "type": "redis",
                "url": url,
                "socket_timeout_s": 1.0,
                "bulk": bulk or {"type": "redis"},
            },
            "block_size": 32,
            **kw,
        }
    )


def _generate(engine: NativeEngine, rid: str, prompt: list[int] = PROMPT) -> list[int]:
    engine.add_request(
        EngineRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    )
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.extend(o.new_token_ids)
    assert engine.kv_connector is not None
    engine.kv_connector.client.flush()
    return out


def _plain(model: Path) -> NativeEngine:
    """An engine whose tier is the embedded memory store: nothing shared, so always cold."""
    return load_native_engine(model, ENGINE, kvtier=KVTierConfig(block_size=32))


@pytest.fixture(scope="module")
def cold_tokens(tiny_model: Path) -> list[int]:
    return _generate(_plain(tiny_model), "cold")


def test_replica_b_reuses_kv_written_by_replica_a(
    tiny_model: Path, redis_server: Any, cold_tokens: list[int]
) -> None:
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    assert _generate(a, "a") == cold_tokens
    stored = a.stats().kvtier
    assert stored["blocks_stored"] == 7 + 1  # 7 NoPE blocks of [0, 224) + the RoPE block [192, 224)
    assert len(redis_server.client().keys("mvkv:*")) == 8
    b = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    assert _generate(b, "b") == cold_tokens
    stats = b.stats()
    assert stats.kvtier["hit_tokens"] == 224 and stats.kvtier["miss_tokens"] == 250 - 224
    assert stats.kvtier["bytes_in"] > 0 and stats.prefix_cache_hit_tokens == 224


def test_bit_flip_is_detected_deleted_and_recomputed(
    tiny_model: Path, redis_server: Any, cold_tokens: list[int]
) -> None:
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    _generate(a, "a")
    r = redis_server.client()
    key = sorted(k for k in r.keys("mvkv:*") if b":global:" in k)[0]
    value = bytearray(r.get(key))
    value[-100] ^= 0x10
    r.set(key, bytes(value))
    b = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    assert _generate(b, "b") == cold_tokens
    assert b.stats().kvtier["checksum_failures"] == 1 and b.stats().kvtier["hit_tokens"] == 0
    assert r.get(key) is not None  # b recomputed the prefix and stored a good block again
    from maverick_serve.kvtier.codec import decode_block

    decode_block(r.get(key))  # the stored value is valid again


def test_foreign_or_truncated_value_is_a_miss(
    tiny_model: Path, redis_server: Any, cold_tokens: list[int]
) -> None:
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    _generate(a, "a")
    r = redis_server.client()
    keys = sorted(k for k in r.keys("mvkv:*") if b":global:" in k)
    r.set(keys[0], b"not a block")
    r.set(keys[1], r.get(keys[1])[:50])
    b = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    assert _generate(b, "b") == cold_tokens
    assert b.stats().kvtier["checksum_failures"] >= 1


def test_other_weights_never_reuse_a_block(tiny_model: Path, redis_server: Any, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_model(preset("tiny"), other, seed=999)
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    _generate(a, "a")
    b = load_native_engine(other, ENGINE, kvtier=_tier(redis_server.url))
    expected = _generate(_plain(other), "x")
    assert _generate(b, "b") == expected
    assert b.stats().kvtier["hit_tokens"] == 0
    assert a.kv_connector is not None and b.kv_connector is not None
    assert a.kv_connector.fingerprint != b.kv_connector.fingerprint


def test_redis_outage_fails_no_request_and_hits_return(
    tiny_model: Path, redis_server: Any, cold_tokens: list[int]
) -> None:
    engine = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    redis_server.stop()
    assert _generate(engine, "down") == cold_tokens  # served by recomputing
    assert engine.stats().kvtier["errors"] >= 1 and engine.stats().kvtier["hit_tokens"] == 0
    assert engine.stats().kvtier["breaker_opens"] == 1  # one failure opened it; the rest skipped
    redis_server.start()  # same port, empty
    # Requests keep asking; after the backoff a background probe finds the store and closes it.
    client = engine.kv_connector.client
    deadline = time.monotonic() + client.breaker.backoff_s + client.probe_timeout_s + 5
    while not client.breaker.allow():
        assert time.monotonic() < deadline, "the breaker did not close after Redis came back"
        time.sleep(0.05)
    assert engine.stats().kvtier["breaker_closes"] == 1
    other = torch.randint(0, 1900, (250,), generator=torch.Generator().manual_seed(5)).tolist()
    _generate(engine, "store", other)  # reconnects on its own and stores
    fresh = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url))
    _generate(fresh, "hit", other)
    assert fresh.stats().kvtier["hit_tokens"] == 224


def test_required_tier_refuses_to_start_when_unreachable(tiny_model: Path) -> None:
    cfg = _tier("redis://127.0.0.1:1/0", required=True)
    with pytest.raises(RuntimeError, match=r"kvtier\.required is true but the KV store is unreachable"):
        load_native_engine(tiny_model, ENGINE, kvtier=cfg)


def test_wrong_password_and_tls_mismatch(tiny_model: Path, redis_with_password: Any) -> None:
    good = redis_with_password.url
    bad = good.replace("s3cret", "wrong")
    with pytest.raises(RuntimeError, match=r"unreachable: redis PING failed \(redis://127"):
        load_native_engine(tiny_model, ENGINE, kvtier=_tier(bad, required=True))
    tls = good.replace("redis://", "rediss://")
    with pytest.raises(RuntimeError, match="unreachable"):
        load_native_engine(tiny_model, ENGINE, kvtier=_tier(tls, required=True))
    engine = load_native_engine(tiny_model, ENGINE, kvtier=_tier(good, required=True))
    _generate(engine, "ok")
    assert engine.stats().kvtier["blocks_stored"] == 8 and engine.stats().kvtier["errors"] == 0


def test_tls_with_password_end_to_end(tiny_model: Path, redis_with_tls: Any, cold_tokens: list[int]) -> None:
    url = redis_with_tls.url
    assert url.startswith("rediss://:s3cret@")
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(url, required=True))
    assert _generate(a, "a") == cold_tokens and a.stats().kvtier["blocks_stored"] == 8
    b = load_native_engine(tiny_model, ENGINE, kvtier=_tier(url, required=True))
    assert _generate(b, "b") == cold_tokens
    assert b.stats().kvtier["hit_tokens"] == 224 and b.stats().kvtier["errors"] == 0
    untrusted = url.split("?")[0]  # the self-signed certificate is not in the system CA store
    with pytest.raises(RuntimeError, match=r"unreachable.*(certificate|SSL)"):
        load_native_engine(tiny_model, ENGINE, kvtier=_tier(untrusted, required=True))
    plain = url.split("?")[0].replace("rediss://", "redis://")
    with pytest.raises(RuntimeError, match="unreachable"):
        load_native_engine(tiny_model, ENGINE, kvtier=_tier(plain, required=True))


def test_values_above_the_size_limit_are_not_stored(tiny_model: Path, redis_server: Any) -> None:
    cfg = _tier(redis_server.url)
    cfg.store.max_value_bytes = 1000  # type: ignore[union-attr]
    engine = load_native_engine(tiny_model, ENGINE, kvtier=cfg)
    _generate(engine, "big")
    assert redis_server.client().keys("mvkv:*") == []


def test_unix_socket_url(tiny_model: Path, redis_server: Any, cold_tokens: list[int]) -> None:
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.unix_url, required=True))
    assert _generate(a, "a") == cold_tokens
    b = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.unix_url))
    assert _generate(b, "b") == cold_tokens
    assert b.stats().kvtier["hit_tokens"] == 224


def test_allkeys_lru_evictions_are_misses(tiny_model: Path, tmp_path: Path, cold_tokens: list[int]) -> None:
    import redis

    from maverick_serve.kvtier.redis_process import RedisProcess

    server = RedisProcess(tmp_path, maxmemory="3mb")  # holds a few of the ~130 KB blocks of each prompt
    server.start()
    try:
        writer = load_native_engine(tiny_model, ENGINE, kvtier=_tier(server.url))
        _generate(writer, "first", PROMPT)  # stored first, so least recently used below
        for seed in range(12):  # far more than fits: Redis evicts least-recently-used blocks
            _generate(
                writer,
                f"w{seed}",
                torch.randint(0, 1900, (250,), generator=torch.Generator().manual_seed(100 + seed)).tolist(),
            )
        assert writer.stats().kvtier["errors"] == 0
        assert int(redis.Redis(port=server.port).info("stats")["evicted_keys"]) > 0
        reader = load_native_engine(tiny_model, ENGINE, kvtier=_tier(server.url))
        assert _generate(reader, "r", PROMPT) == cold_tokens
        stats = reader.stats().kvtier
        assert stats["hit_tokens"] < 224 and stats["errors"] == 0  # evicted blocks are misses, not errors
    finally:
        server.stop()


@pytest.mark.mooncake
def test_mooncake_bulk_transport_reuse_across_replicas(
    tiny_model: Path, redis_server: Any, cold_tokens: list[int]
) -> None:
    """Runs where `mooncake-transfer-engine` is installed and a master is reachable:
    MAVERICK_MOONCAKE_MASTER=host:port, MAVERICK_MOONCAKE_METADATA=http://host:8080/metadata."""
    if importlib.util.find_spec("mooncake") is None or "MAVERICK_MOONCAKE_MASTER" not in os.environ:
        pytest.skip("needs mooncake-transfer-engine and MAVERICK_MOONCAKE_MASTER")
    bulk = {
        "type": "mooncake",
        "master_server": os.environ["MAVERICK_MOONCAKE_MASTER"],
        "metadata_server": os.environ["MAVERICK_MOONCAKE_METADATA"],
        "local_hostname": os.environ.get("MAVERICK_MOONCAKE_HOST", "127.0.0.1"),
        "protocol": os.environ.get("MAVERICK_MOONCAKE_PROTOCOL", "rdma"),
        "global_segment_bytes": 256 << 20,
        "local_buffer_bytes": 64 << 20,
    }
    a = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url, bulk, required=True))
    assert _generate(a, "a") == cold_tokens
    r = redis_server.client()
    assert {r.get(k) for k in r.keys("mvkv:*")} == {b"1"}  # Redis holds markers, Mooncake the bytes
    b = load_native_engine(tiny_model, ENGINE, kvtier=_tier(redis_server.url, bulk))
    assert _generate(b, "b") == cold_tokens
    assert b.stats().kvtier["hit_tokens"] == 224
