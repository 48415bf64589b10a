"""`bench kvtier --engine vllm`: the KV tier under the vLLM backend (run in .venv-vllm).

Two engine replicas on vLLM (`EngineServer`, no Ray) and one local redis-server: TTFT of a long
prompt computed cold on replica A, then served on replica B from what A stored (B never saw it),
medians over rounds with a fresh prompt each; and the bytes the tier holds per prompt token
against an all-layers layout.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from maverick_serve.bench.kvtier_bench import local_redis
from maverick_serve.config.model import ModelSpec
from maverick_serve.serving.engine_server import EngineServer

VOCAB_TEXT = 1900  # the tiny model's ordinary tokens


def _config(model_dir: Path, url: str, tier_block: int, tokens: int, budget: int) -> dict[str, Any]:
    return {
        "model": {"path": str(model_dir), "served_model_name": "bench"},
        "engine": {
            "backend": "vllm",
            "block_size": 32,
            "max_model_len": max(4096, tokens + 64),
            "max_num_batched_tokens": budget,
            "kv_cache_memory_gib": 1,
        },
        "kvtier": {"block_size": tier_block, "store": {"type": "redis", "url": url}},
    }


async def _ttft(server: EngineServer, rid: str, prompt: list[int]) -> tuple[float, int]:
    item = {"request_id": rid, "prompt_token_ids": prompt, "sampling": {"max_tokens": 1, "temperature": 0.0}}
    start = time.perf_counter()
    first: float | None = None
    cached = 0
    async for event in server.generate(item):
        if "error" in event:
            raise RuntimeError(f"request {rid} failed: {event['error']}")
        first = first or time.perf_counter() - start
        if event.get("usage"):
            cached = event["usage"]["cached_tokens"]
    assert first is not None
    return first, cached


def _stored_bytes(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    return sum(int(client.strlen(k)) for k in client.scan_iter("mvkv:*") if not k.endswith(b":layout"))


def _wait_settled(url: str, timeout_s: float = 60.0) -> int:
    """The tier's bytes once write-behind stores stopped arriving."""
    last, deadline = -1, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _stored_bytes(url)
        if now == last:
            return now
        last = now
        time.sleep(0.5)
    return last


def run_bench(model_dir: Path, tier_block: int, tokens: int, rounds: int, budget: int) -> str:
    spec = ModelSpec.from_pretrained_dir(model_dir)
    t = spec.text
    loop = asyncio.new_event_loop()  # one loop for both replicas, as Serve gives each its own
    rng = random.Random(0)
    cold, warm, lines = [], [], []
    with local_redis() as (url, _port):
        cfg = _config(model_dir, url, tier_block, tokens, budget)
        a, b = EngineServer(cfg, replica_name="a"), EngineServer(cfg, replica_name="b")
        try:
            for server in (a, b):  # warm-up: first-call costs out of the figures
                loop.run_until_complete(
                    _ttft(server, "warmup", [rng.randrange(VOCAB_TEXT) for _ in range(256)])
                )
            hit_tokens = []
            for r in range(rounds):
                prompt = [rng.randrange(VOCAB_TEXT) for _ in range(tokens)]
                before = _wait_settled(url)
                cold_s, _ = loop.run_until_complete(_ttft(a, f"cold-{r}", prompt))
                stored = _wait_settled(url) - before
                warm_s, cached = loop.run_until_complete(_ttft(b, f"hit-{r}", prompt))
                cold.append(cold_s)
                warm.append(warm_s)
                hit_tokens.append(cached)
        finally:
            a.shutdown()
            b.shutdown()
    c, w = statistics.median(cold), statistics.median(warm)
    lines.append(
        f"vLLM backend, {rounds} rounds, tier block {tier_block}, prefill budget {budget} tokens/step; "
        f"tier hit tokens per round {hit_tokens}"
    )
    lines.append(
        f"(2) TTFT of a {tokens:,}-token prompt: cold {c * 1000:,.0f} ms, tier hit on another replica "
        f"{w * 1000:,.0f} ms → {w / c:.3f}× (target ≤ 0.15×; medians)"
    )
    all_layers = (
        tokens // tier_block * tier_block * t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 4
    )
    lines.append(
        f"(3) bytes stored per token: Llama 4-aware {stored / tokens:,.0f} B vs all layers "
        f"{all_layers / tokens:,.0f} B → {stored / all_layers:.3f}× (target ≤ 0.3×)"
    )
    return "\n".join(lines)
