"""`maverick-serve bench kvtier`: the KV tier's figures in one run.

1. Store/load GB/s of block-sized values through our path (encode + pipelined SET, pipelined
   EXISTS + MGET + decode) beside `redis-benchmark`'s raw SET/GET for the same value size.
2. TTFT of a long prompt cold vs a tier hit on another replica (two engines, one Redis).
3. Bytes stored per prompt token, Llama 4-aware layout vs all layers.
4. Time and peak RSS of a ≥128K-token prefill streamed to the tier, and the time lost when it is
   killed half-way and resumed on a fresh engine; projected time and tier bytes for 1M and 10M
   tokens on Scout and Maverick.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from maverick_serve.config import preset
from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.kvtier.codec import decode_block, encode_block, encode_block_parts
from maverick_serve.kvtier.redis_process import RedisProcess
from maverick_serve.kvtier.redis_store import RedisKVStore
from maverick_serve.kvtier.store import StoreValue
from maverick_serve.kvtier.transport import RedisBulkTransport
from maverick_serve.serving.engine_factory import load_native_engine


@contextmanager
def local_redis() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port (no persistence)."""
    server = RedisProcess(Path(tempfile.mkdtemp(prefix="bench-redis-")))
    server.start()
    try:
        yield server.url, server.port
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def store_throughput(
    url: str,
    spec: ModelSpec,
    block_tokens: int,
    blocks: int,
    batch: int = 16,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float, int]:
    """(store GB/s, load GB/s, value bytes) through encode + pipelined SET / EXISTS + MGET + decode."""
    t = spec.text
    shape = (len(t.global_layers), 2, block_tokens, t.num_key_value_heads, t.head_dim)
    tensor = torch.randn(shape).to(dtype)
    keys = [f"bench:{i}" for i in range(blocks)]

    async def run() -> tuple[float, float, int]:
        # Double-buffered, as the engine's writer is: frame batch i+1 while batch i is on the wire.
        store = RedisKVStore(url)
        value_len = len(encode_block(tensor, "global", 0, block_tokens))
        batches = [keys[i : i + batch] for i in range(0, blocks, batch)]
        start = time.perf_counter()
        in_flight: asyncio.Task[None] | None = None
        for chunk in batches:
            items: list[tuple[str, StoreValue]] = [
                (k, encode_block_parts(tensor, "global", 0, block_tokens)) for k in chunk
            ]
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.create_task(store.put_many(items, None))
        assert in_flight is not None
        await in_flight
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        assert all(await store.exists_many(keys))  # the engine's one lookup round trip
        loading = asyncio.create_task(store.get_many(batches[0]))
        for nxt in [*batches[1:], None]:
            values = await loading
            if nxt is not None:
                loading = asyncio.create_task(store.get_many(nxt))
            for v in values:
                assert v is not None
                decode_block(v)
        get_s = time.perf_counter() - start
        await store.delete_many(keys)
        await store.close()
        total = value_len * blocks
        return total / put_s / 1e9, total / get_s / 1e9, value_len

    return asyncio.run(run())


def transport_throughput(url: str, value_len: int, blocks: int, batch: int = 16) -> tuple[float, float]:
    """(SET GB/s, GET GB/s) of the bulk transport alone: the wire without our codec."""
    transport = RedisBulkTransport(url, 4, 10.0)
    value = os.urandom(value_len)
    keys = [f"bench:raw:{i}" for i in range(blocks)]
    start = time.perf_counter()
    for i in range(0, blocks, batch):
        transport.put_many([(k, value) for k in keys[i : i + batch]], None)
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, blocks, batch):
        transport.get_many(keys[i : i + batch])
    get_s = time.perf_counter() - start
    transport.delete_many(keys)
    transport.close()
    return value_len * blocks / put_s / 1e9, value_len * blocks / get_s / 1e9


def redis_benchmark(
    port: int, value_bytes: int, requests: int, pipeline: int = 16
) -> tuple[float, float] | None:
    """redis-benchmark's SET and GET GB/s for the same value size (None when it is not installed)."""
    if shutil.which("redis-benchmark") is None:
        return None
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "set,get",
            "-d",
            str(value_bytes),
            "-n",
            str(requests),
            "-P",
            str(pipeline),
            "-c",
            "1",
            "-q",
            "--csv",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    rates = {}
    for line in out.splitlines():
        m = re.match(r'"(SET|GET)","([0-9.]+|inf)"', line)
        if m:  # "inf": the run was too short for its timer (raise --blocks)
            rate = float(m.group(2))
            rates[m.group(1)] = rate * value_bytes / 1e9 if math.isfinite(rate) else float("nan")
    return (rates.get("SET", float("nan")), rates.get("GET", float("nan"))) if rates else None


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1900) for _ in range(n)]


def ttft(engine: NativeEngine, prompt: list[int], rid: str) -> float:
    engine.add_request(EngineRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=1)))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    if engine.kv_connector is not None:
        engine.kv_connector.flush(timeout_s=600)
    return elapsed


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def projection(name: str, tokens: int, gpus: int, tflops_per_gpu: float, mfu: float) -> str:
    """Prefill time and Llama 4-aware tier bytes for a real preset (bf16), from FLOP counts."""
    spec = preset(name)
    t = spec.text
    kv_layer_token = 2 * t.num_key_value_heads * t.head_dim * 2  # bf16
    tier = (
        len(t.global_layers) * tokens * kv_layer_token
        + len(t.chunked_layers) * t.attention_chunk_size * kv_layer_token
    )
    all_layers = t.num_hidden_layers * tokens * kv_layer_token
    active = 17.2e9
    linear = 2 * active * tokens
    d = t.num_attention_heads * t.head_dim
    global_attn = len(t.global_layers) * 2 * 2 * d * tokens * tokens / 2
    chunked_attn = len(t.chunked_layers) * 2 * 2 * d * tokens * t.attention_chunk_size / 2
    seconds = (linear + global_attn + chunked_attn) / (gpus * tflops_per_gpu * 1e12 * mfu)
    return (
        f"{name:<9} {tokens:>10,} tokens: prefill ≈ {seconds / 60:,.1f} min on {gpus}×{tflops_per_gpu:g} "
        f"TFLOP/s at {mfu:.0%} MFU; tier {tier / 1e9:,.1f} GB (all layers {all_layers / 1e9:,.1f} GB)"
    )


def throughput_lines(
    url: str, port: int, spec: ModelSpec, tier_block: int, blocks: int, dtype: torch.dtype, label: str
) -> list[str]:
    """Our store/load vs redis-benchmark for one block size. Ours and redis-benchmark alternate and
    the medians of 3 are reported: both share the two cores with redis-server, and single runs
    here swing by 2×."""
    ours, wire, theirs = [], [], []
    for _ in range(3):
        ours.append(store_throughput(url, spec, tier_block, blocks, dtype=dtype))
        wire.append(transport_throughput(url, ours[-1][2], blocks))
        theirs.append(redis_benchmark(port, ours[-1][2], blocks))
    put_gbs = statistics.median(o[0] for o in ours)
    get_gbs = statistics.median(o[1] for o in ours)
    value_len = ours[0][2]
    lines = [
        f"{label} block values of {value_len:,} B ({tier_block} tokens × {len(spec.text.global_layers)} "
        f"global layers, {str(dtype).removeprefix('torch.')}), {blocks} blocks, pipelines of 16, "
        "median of 3 alternating runs:"
    ]
    if not all(theirs):
        return [
            *lines,
            f"    store {put_gbs:.2f} GB/s, load {get_gbs:.2f} GB/s (redis-benchmark not installed)",
        ]
    raw_set = statistics.median(t[0] for t in theirs if t)
    raw_get = statistics.median(t[1] for t in theirs if t)
    wire_put = statistics.median(w[0] for w in wire)
    wire_get = statistics.median(w[1] for w in wire)
    return [
        *lines,
        f"    store {put_gbs:.2f} GB/s vs redis-benchmark SET {raw_set:.2f} GB/s → "
        f"{put_gbs / raw_set:.2f}× (target ≥ 0.8×)",
        f"    load  {get_gbs:.2f} GB/s vs redis-benchmark GET {raw_get:.2f} GB/s → "
        f"{get_gbs / raw_get:.2f}× (target ≥ 0.8×)",
        f"    wire alone (bulk transport, no codec): SET {wire_put:.2f} GB/s ({wire_put / raw_set:.2f}×), "
        f"GET {wire_get:.2f} GB/s ({wire_get / raw_get:.2f}×)",
    ]


def run_bench(
    model_dir: Path, tier_block: int, ttft_tokens: int, long_tokens: int, blocks: int, budget: int
) -> str:
    spec = ModelSpec.from_pretrained_dir(model_dir)
    lines: list[str] = []
    with local_redis() as (url, port):
        lines += throughput_lines(url, port, spec, tier_block, blocks, torch.float32, "(1)")
        maverick = preset("maverick")
        big_blocks = max(16, blocks // 25)  # same bytes in 25× larger values
        lines += throughput_lines(url, port, maverick, 256, big_blocks, torch.bfloat16, "(1b) Maverick:")

        tier = KVTierConfig.model_validate({"store": {"type": "redis", "url": url}, "block_size": tier_block})
        cfg = NativeEngineConfig(
            kv_cache_memory_gib=max(0.25, (ttft_tokens + long_tokens) * 4e-6),
            max_num_batched_tokens=budget,
            enable_prefix_caching=False,
        )
        prompt = _prompt(ttft_tokens, 1)
        writer = load_native_engine(model_dir, cfg, kvtier=tier)
        cold = ttft(writer, prompt, "cold")
        reader = load_native_engine(model_dir, cfg, kvtier=tier)
        warm = ttft(reader, prompt, "warm")
        lines.append(
            f"(2) TTFT of a {ttft_tokens:,}-token prompt: cold {cold * 1000:,.0f} ms, tier hit on another "
            f"replica {warm * 1000:,.0f} ms → {warm / cold:.3f}× (target ≤ 0.15×)"
        )
        stored = writer.stats().kvtier["bytes_out"]
        t = spec.text
        all_layers = (
            ttft_tokens
            // tier_block
            * tier_block
            * t.num_hidden_layers
            * 2
            * t.num_key_value_heads
            * t.head_dim
            * 4
        )
        lines.append(
            f"(3) bytes stored per token: Llama 4-aware {stored / ttft_tokens:,.0f} B vs all layers "
            f"{all_layers / ttft_tokens:,.0f} B → {stored / all_layers:.3f}× (target ≤ 0.3×)"
        )
        del writer, reader

        if long_tokens:
            # One sequence at a time: the KV budget goes to the NoPE layers' whole-prefix blocks.
            kv_gib = (
                long_tokens
                * len(spec.text.global_layers)
                * 2
                * spec.text.num_key_value_heads
                * spec.text.head_dim
                * 4
                / 1024**3
                + 0.5
            )
            long_cfg = cfg.model_copy(
                update={"max_model_len": long_tokens + 16, "max_num_seqs": 2, "kv_cache_memory_gib": kv_gib}
            )
            prompt = _prompt(long_tokens, 2)
            rss0 = peak_rss_mib()
            full_engine = load_native_engine(model_dir, long_cfg, kvtier=tier)
            full = ttft(full_engine, prompt, "long")
            rss = peak_rss_mib()
            del full_engine
            lines.append(
                f"(4) {long_tokens:,}-token prefill streamed to the tier: {full:,.1f} s "
                f"({long_tokens / full:,.0f} tok/s), peak RSS {rss:,.0f} MiB (was {rss0:,.0f} before)"
            )
            # Killed half-way: a fresh tier namespace so nothing from the full run is reused.
            half_tier = tier.model_copy(update={"key_prefix": f"half{os.getpid()}"})
            dying = load_native_engine(model_dir, long_cfg, kvtier=half_tier)
            dying.add_request(EngineRequest("h", prompt, SamplingParams(temperature=0, max_tokens=1)))
            start = time.perf_counter()
            seq = dying.seqs["h"]
            while seq.num_computed < long_tokens // 2:
                dying.step()
            assert dying.kv_connector is not None
            dying.kv_connector.flush(timeout_s=600)
            first_half = time.perf_counter() - start
            done = seq.num_computed
            del dying, seq
            resumed_engine = load_native_engine(model_dir, long_cfg, kvtier=half_tier)
            resumed = ttft(resumed_engine, prompt, "h2")
            hit = resumed_engine.stats().kvtier["hit_tokens"]
            lost = first_half + resumed - full
            lines.append(
                f"    killed after {done:,} tokens ({first_half:,.1f} s), resumed from {int(hit):,} stored "
                f"tokens in {resumed:,.1f} s: {lost:,.1f} s lost vs uninterrupted"
            )
    lines.append("projections (bf16 KV, Llama 4-aware tier; FLOPs from 17.2B active params + attention):")
    for name in ("scout", "maverick"):
        for tokens in (1_048_576, 10_485_760):
            if tokens <= preset(name).text.max_position_embeddings:
                lines.append("    " + projection(name, tokens, 8, 989, 0.4))
    return "\n".join(lines)
