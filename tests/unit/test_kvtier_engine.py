"""The KV tier inside the engine with the embedded store: reuse, layout size, evicted keys."""

from __future__ import annotations

from pathlib import Path

import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.kvtier.store import MemoryKVStore
from maverick_serve.serving.engine_factory import load_native_engine

ENGINE = NativeEngineConfig(kv_cache_memory_gib=0.05, max_num_batched_tokens=256, enable_prefix_caching=False)
TIER = KVTierConfig(block_size=32)


def _generate(engine: NativeEngine, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(
        EngineRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    )
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.extend(o.new_token_ids)
    assert engine.kv_connector is not None
    engine.kv_connector.client.flush()
    return out


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _share(a: NativeEngine, b: NativeEngine) -> None:
    assert a.kv_connector is not None and b.kv_connector is not None
    b.kv_connector.client.store = a.kv_connector.client.store


def test_llama4_aware_layout_stores_a_quarter_of_all_layers(tiny_model: Path) -> None:
    engine = load_native_engine(tiny_model, ENGINE, kvtier=TIER)
    n = 1000
    _generate(engine, "long", _prompt(n))
    stored = engine.stats().kvtier["bytes_out"]
    spec = engine.spec.text
    all_layers = n // 32 * 32 * spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * 4
    ratio = stored / all_layers
    # 2 of 8 layers are NoPE (global); RoPE layers add only the final chunk's blocks.
    assert 0.25 <= ratio <= 0.3, ratio


def test_tier_hit_on_a_second_engine_gives_cold_tokens(tiny_model: Path) -> None:
    a = load_native_engine(tiny_model, ENGINE, kvtier=TIER)
    prompt = _prompt(300, 3)
    cold = _generate(a, "a", prompt)
    b = load_native_engine(tiny_model, ENGINE, kvtier=TIER)
    _share(a, b)
    assert _generate(b, "b", prompt) == cold
    assert b.stats().kvtier["hit_tokens"] == 288  # 9 tier blocks of 32 (the last token is recomputed)


def test_keys_evicted_between_lookup_and_load_are_a_miss(tiny_model: Path) -> None:
    a = load_native_engine(tiny_model, ENGINE, kvtier=TIER)
    prompt = _prompt(300, 4)
    cold = _generate(a, "a", prompt)

    class EvictingStore(MemoryKVStore):
        async def get_many(self, keys: list[str]) -> list[bytes | None]:
            values = await super().get_many(keys)
            return [None, *values[1:]]  # the first block vanished after EXISTS said yes

    b = load_native_engine(tiny_model, ENGINE, kvtier=TIER)
    assert a.kv_connector is not None and b.kv_connector is not None
    store = EvictingStore(1 << 30)
    store.data = a.kv_connector.client.store.data  # type: ignore[attr-defined]
    b.kv_connector.client.store = store
    assert _generate(b, "b", prompt) == cold
    stats = b.stats().kvtier
    assert stats["hit_tokens"] == 0 and stats["errors"] == 0 and stats["checksum_failures"] == 0


def test_interrupted_long_prefill_resumes_from_the_last_stored_block(tiny_model: Path) -> None:
    prompt = _prompt(1000, 7)
    cfg = ENGINE.model_copy(update={"max_num_batched_tokens": 128})
    uninterrupted = _generate(load_native_engine(tiny_model, cfg, kvtier=TIER), "u", prompt)
    dying = load_native_engine(tiny_model, cfg, kvtier=TIER)
    dying.add_request(
        EngineRequest("p", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    )
    for _ in range(4):  # 4 × 128 = 512 prompt tokens, then the replica "dies"
        dying.step()
    assert dying.kv_connector is not None
    dying.kv_connector.client.flush()
    retry = load_native_engine(tiny_model, cfg, kvtier=TIER)
    _share(dying, retry)
    assert _generate(retry, "p", prompt) == uninterrupted
    assert retry.stats().kvtier["hit_tokens"] == 512  # resumed at the last stored chunk boundary
