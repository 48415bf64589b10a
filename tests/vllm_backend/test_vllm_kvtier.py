"""The KV tier under the vLLM backend: `Llama4TierConnector` in vLLM's own processes, a real
redis-server, two engine replicas (`EngineServer`, no Ray). The hybrid KV manager stays on, the
tier holds a quarter of an all-layers layout, a hit gives the cold tokens, replica B reuses what
replica A computed, and a flipped bit or a stopped Redis costs a recompute, never a wrong token."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from maverick_serve.kvtier.codec import decode_block
from maverick_serve.kvtier.redis_process import RedisProcess
from maverick_serve.serving.engine_server import EngineServer

pytestmark = pytest.mark.vllm

VOCAB_TEXT = 1900
TIER_BLOCK = 32  # two per attention chunk (64 on the tiny model): chunked blocks are stored too
PREFIX = "mvkv-vllm"


def _config(model: Path, url: str) -> dict[str, Any]:
    return {
        "model": {"path": str(model), "served_model_name": "tiny"},
        "engine": {
            "backend": "vllm",
            "block_size": 32,
            "max_model_len": 4096,
            "max_num_batched_tokens": 256,  # long prompts prefill in several steps
            "kv_cache_memory_gib": 1,
        },
        "kvtier": {
            "enabled": True,
            "block_size": TIER_BLOCK,
            "key_prefix": PREFIX,
            "store": {"type": "redis", "url": url},
        },
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(text_model: Path, store: RedisProcess) -> Iterator[dict[str, EngineServer]]:
    made = {name: EngineServer(_config(text_model, store.url), replica_name=name) for name in ("a", "b")}
    yield made
    for server in made.values():
        server.shutdown()


LOOP = asyncio.new_event_loop()  # one loop per module, as a Serve replica has


def _greedy(server: EngineServer, rid: str, prompt: list[int], n: int = 12) -> tuple[list[int], int]:
    """(tokens, prompt tokens vLLM did not compute: local prefix cache + tier)."""

    async def run() -> list[dict[str, Any]]:
        item = {
            "request_id": rid,
            "prompt_token_ids": prompt,
            "sampling": {"max_tokens": n, "temperature": 0.0},
        }
        return [event async for event in server.generate(item)]

    events = LOOP.run_until_complete(run())
    assert events[-1].get("finished") and "error" not in events[-1], events[-1]
    tokens = [t for e in events for t in e["new_token_ids"]]
    return tokens, events[-1]["usage"]["cached_tokens"]


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB_TEXT) for _ in range(n)]


def _stored(client: redis.Redis) -> dict[str, bytes]:
    return {k.decode(): client.get(k) for k in client.scan_iter(f"{PREFIX}:*") if not k.endswith(b":layout")}


def _wait_stored(client: redis.Redis, count: int, timeout_s: float = 20.0) -> dict[str, bytes]:
    deadline = LOOP.time() + timeout_s
    while True:
        got = _stored(client)
        if len(got) >= count or LOOP.time() > deadline:
            return got
        LOOP.run_until_complete(asyncio.sleep(0.1))


def test_hybrid_manager_stays_on_and_the_tier_holds_a_quarter(
    replicas: dict[str, EngineServer], store: RedisProcess
) -> None:
    client = redis.Redis.from_url(store.url)
    # vLLM's KV cache groups, as the connector found them (it writes them next to the blocks).
    layouts = [json.loads(client.get(k)) for k in client.scan_iter(f"{PREFIX}:*:layout")]
    assert layouts, "the connector wrote no layout record"
    kinds = [g["kind"] for g in layouts[0]["groups"]]
    assert sorted(kinds) == ["chunked", "chunked", "chunked", "global"], layouts[0]
    assert all(len(g["layers"]) == 2 for g in layouts[0]["groups"])
    # HMA on: 1 GiB holds 16384 blocks of 32 tokens (off, the chunked layers would keep every
    # token and each block would cost all 8 layers: 4096 blocks).
    assert replicas["a"].engine.collector.num_blocks == 16384
    client.flushall()
    # A prompt of 16 chunks + 1 token: 32 global tier blocks and no chunked one (its last chunk
    # holds one token, not a whole block).
    prompt = _prompt(1, 16 * 64 + 1)
    _greedy(replicas["a"], "quarter", prompt, 2)
    values = _wait_stored(client, 32)
    headers = [decode_block(v)[1] for v in values.values()]
    assert len(values) == 32 and {h.group for h in headers} == {"global"}
    payload = sum(len(v) for v in values.values())
    all_layers = 32 * 8 * 2 * TIER_BLOCK * 128 * 4  # blocks x layers x (K,V) x tokens x 128 fp32
    assert 0.25 <= payload / all_layers < 0.2505, payload / all_layers  # (+ a 61-byte header each)


def test_replica_b_reuses_replica_a_and_a_hit_gives_the_cold_tokens(
    replicas: dict[str, EngineServer], store: RedisProcess
) -> None:
    client = redis.Redis.from_url(store.url)
    client.flushall()
    # Prompt length -> (values A stores, tokens B loads). The tier holds every global block and the
    # chunked blocks of the prompt's last chunk; a hit ends on a chunk boundary or inside that chunk.
    cases = {300: (9 + 1, 288), 640: (20, 576), 1000: (31 + 1, 992)}
    for seed, (length, (values, hit_tokens)) in enumerate(cases.items()):
        prompt = _prompt(10 + seed, length)
        cold, cached_a = _greedy(replicas["a"], f"cold-{seed}", prompt)
        assert cached_a == 0
        stored = _wait_stored(client, values)
        assert len(stored) == values, (length, sorted(stored))
        hit, cached_b = _greedy(replicas["b"], f"hit-{seed}", prompt)
        # B never saw the prompt: what it did not compute came from A, through the tier.
        assert cached_b == hit_tokens, (length, cached_b)
        assert hit == cold
        client.flushall()


def test_a_flipped_bit_is_detected_and_recomputed(
    replicas: dict[str, EngineServer], store: RedisProcess
) -> None:
    client = redis.Redis.from_url(store.url)
    client.flushall()
    prompt = _prompt(5, 4 * TIER_BLOCK + 1)
    cold, _ = _greedy(replicas["a"], "flip-cold", prompt)
    values = _wait_stored(client, 4)
    key = sorted(values)[0]
    corrupt = bytearray(values[key])
    corrupt[-100] ^= 0x10  # one bit of the payload
    client.set(key, bytes(corrupt))
    tokens, cached = _greedy(replicas["b"], "flip-hit", prompt)
    assert tokens == cold
    # The load failed as a whole and vLLM recomputed; its second lookup found the blocks before
    # the deleted one at most.
    assert cached < 4 * TIER_BLOCK
    # The corrupt value was deleted; the recompute stored it afresh.
    fresh = _wait_stored(client, 4)
    assert key in fresh and fresh[key] == values[key]


def test_prefill_decode_split_equals_monolithic(
    replicas: dict[str, EngineServer], store: RedisProcess
) -> None:
    client = redis.Redis.from_url(store.url)
    client.flushall()
    prompt = _prompt(8, 7 * TIER_BLOCK + 13)  # ends inside a chunk: chunked blocks hand over too
    monolithic, _ = _greedy(replicas["a"], "pd-mono", prompt)
    client.flushall()
    LOOP.run_until_complete(replicas["a"].engine.llm.reset_prefix_cache())  # A forgets the prompt
    item = {
        "request_id": "pd",
        "prompt_token_ids": prompt,
        "sampling": {"max_tokens": 12, "temperature": 0.0},
    }
    # Prefill on B: it returns once the KV is in the tier (the hand-off keys are there).
    handed = LOOP.run_until_complete(replicas["b"].prefill(item))
    assert handed == {"prompt_tokens": len(prompt), "replica": "b"}
    stored = _stored(client)
    assert len(stored) == 7 + 1, sorted(stored)  # 7 global blocks + the last chunk's chunked block
    # Decode on A from the tier: the prompt's 224 tokens come from B's prefill.
    tokens, cached = _greedy(replicas["a"], "pd-decode", prompt)
    assert cached == 7 * TIER_BLOCK
    assert tokens == monolithic


def test_redis_down_is_served_by_recompute(replicas: dict[str, EngineServer], store: RedisProcess) -> None:
    client = redis.Redis.from_url(store.url)
    client.flushall()
    prompt = _prompt(6, 5 * TIER_BLOCK + 7)
    cold, _ = _greedy(replicas["a"], "down-cold", prompt)
    _wait_stored(client, 5)
    store.stop()
    try:
        tokens, cached = _greedy(replicas["b"], "down-hit", prompt)
        assert tokens == cold and cached == 0  # the lookup failed: a miss, served by recompute
        for i in range(3):  # the breaker is open now: lookups skip the store
            assert (
                len(_greedy(replicas["b"], f"down-other-{i}", _prompt(20 + i, 3 * TIER_BLOCK + 3))[0]) == 12
            )
    finally:
        store.start()
