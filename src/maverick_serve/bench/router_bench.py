"""`maverick-serve bench router`: routing decision latency and a replayed workload per policy.

1. Decision latency: `RoutingPolicy.choose` (the default policy, every scorer on) for 8 and 64
   replicas whose prefix caches hold 100K blocks each, for prompts of 2K tokens whose prefix
   some replica holds; plus the time to price a request (router-side block hashing).
2. A replayed workload (a few shared system prompts, many users, a third of the requests with
   one of a few images) through the real router and two in-process engine replicas, under
   round_robin, cache_aware and multimodal_cache_aware: throughput, TTFT p50/p99, hit ratio.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maverick_serve.bench.serve_bench import pct
from maverick_serve.config import preset
from maverick_serve.config.routing import RoutingConfig
from maverick_serve.routing.admission import Admission
from maverick_serve.routing.cost import CostModel, RequestCost
from maverick_serve.routing.hub import ReplicaStateHub
from maverick_serve.routing.policy import make_policy
from maverick_serve.routing.state import ClusterView
from maverick_serve.serving.inprocess import InProcessCluster

MODEL = "llama-4-tiny"


def decision_latency(replicas: int, blocks_per_replica: int, trials: int = 2000) -> tuple[float, float, int]:
    """(p50 µs, p99 µs, indexed keys) of one routing decision: admission, then the policy."""
    rng = random.Random(0)
    frozen = lambda: 0.0  # noqa: E731 - building a 6.4M-block index takes longer than the expiry
    hub = ReplicaStateHub(clock=frozen)
    prompts: list[list[int]] = []
    for r in range(replicas):
        keys = [rng.getrandbits(64) for _ in range(blocks_per_replica)]
        load = {
            "waiting": rng.randrange(8),
            "running": rng.randrange(16),
            "queued_prefill_tokens": rng.randrange(9000),
            # measured rates, so every decision also predicts a queue wait (admission)
            "max_num_seqs": 16,
            "prefill_tokens_per_s": 4000.0 + rng.randrange(4000),
            "step_s": 0.03,
            "finished_per_s": 2.0,
        }
        hub.publish({"replica": f"r{r}", "reset": True, "load": load, "stored": keys, "tier_shared": True})
        prompts.append(keys[:128])  # a 2K-token prompt (16-token blocks) whose prefix r holds
    view = ClusterView(RoutingConfig(index_capacity_blocks=replicas * blocks_per_replica + 1), clock=frozen)
    view.apply(hub.poll(None, 0))
    policy = make_policy(RoutingConfig(), engine_block=16, tier_block=256)
    admission = Admission(RoutingConfig())
    times = []
    for i in range(trials):
        keys = prompts[i % replicas][: rng.randrange(1, 128)] + [rng.getrandbits(64) for _ in range(16)]
        cost = RequestCost(
            prompt_tokens=16 * len(keys), block_keys=keys, tier_keys=keys[::16], session=f"s{i % 97}"
        )
        start = time.perf_counter()
        candidates = [e for e in view.alive() if admission.verdict(e, cost, 1, 600.0).admit]
        policy.choose(view, cost, candidates)
        times.append((time.perf_counter() - start) * 1e6)
    return pct(times, 0.5), pct(times, 0.99), len(view.local)


def pricing_latency(tokens: int = 2048, trials: int = 200) -> float:
    """Median µs to compute a 2K-token prompt's block keys (engine and tier chains)."""
    costs = CostModel(preset("tiny"), engine_block_size=16, tier_block_size=256)
    prompt = [random.Random(1).randrange(10, 1900) for _ in range(tokens)]
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        costs.cost(prompt, [], None)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def _png(seed: int, size: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(requests: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "forest",
        "signal",
        "engine",
        "market",
        "garden",
    ]
    systems = [" ".join(rng.choice(words) for _ in range(700)) for _ in range(4)]
    images = [_png(i, s) for i, s in enumerate((336, 500, 700, 420))]
    out = []
    for i in range(requests):
        content: list[dict[str, Any]] = [{"type": "text", "text": f"question {i}: " + rng.choice(words)}]
        if i % 3 == 2:
            content.append({"type": "image_url", "image_url": {"url": rng.choice(images)}})
        out.append(
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": rng.choice(systems)},
                    {"role": "user", "content": content},
                ],
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "user": f"user-{rng.randrange(12)}",
            }
        )
    return out


async def replay(
    model: Path, policy: str, bodies: list[dict[str, Any]], concurrency: int
) -> dict[str, float]:
    cluster = InProcessCluster(
        {
            "model": {"path": str(model), "served_model_name": MODEL},
            "engine": {"kv_cache_memory_gib": 0.2, "max_model_len": 8192, "num_threads": 1},
            "kvtier": {"enabled": False},
            "router": {"routing": {"policy": policy, "max_queue_per_replica": 1000}},
        },
        replicas=2,
    )
    try:
        await cluster.wait_for_state()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for b in bodies:
            queue.put_nowait(b)
        ttfts: list[float] = []
        cached = prompt = completion = 0

        async def worker() -> None:
            nonlocal cached, prompt, completion
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                first = None
                async with cluster.client.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
                        if event.get("usage"):
                            cached += event["usage"]["prompt_tokens_details"]["cached_tokens"]
                            prompt += event["usage"]["prompt_tokens"]
                            completion += event["usage"]["completion_tokens"]
                ttfts.append(first if first is not None else time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        return {
            "req_s": len(bodies) / elapsed,
            "tok_s": (prompt + completion) / elapsed,
            "ttft_p50": pct(ttfts, 0.5) * 1000,
            "ttft_p99": pct(ttfts, 0.99) * 1000,
            "hit": cached / max(prompt, 1),
        }
    finally:
        await cluster.close()


def run_bench(model: Path, requests: int, concurrency: int, policies: list[str]) -> str:
    lines = [
        "(1) decision latency of multimodal_cache_aware (100K cached blocks per replica, 2K-token prompts):"
    ]
    for replicas in (8, 64):
        p50, p99, keys = decision_latency(replicas, 100_000)
        lines.append(
            f"    {replicas:>2} replicas, {keys:>9,} indexed blocks: p50 {p50:6.1f} µs, p99 {p99:6.1f} µs "
            f"(target p99 ≤ 1,000 µs)"
        )
    lines.append(
        f"    pricing a 2K-token prompt (engine + tier block keys): {pricing_latency():,.0f} µs median"
    )
    bodies = workload(requests)
    lines.append(
        f"(2) replayed workload: {requests} chat requests, 4 shared ~1.4K-token system prompts, 12 users, "
        f"every third with one of 4 images; 2 engine replicas; {concurrency} concurrent clients"
    )
    lines.append(
        f"    {'policy':<24} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>10} {'TTFT p99':>10} {'hit ratio':>10}"
    )
    for policy in policies:
        r = asyncio.run(replay(model, policy, bodies, concurrency))
        lines.append(
            f"    {policy:<24} {r['req_s']:7.2f} {r['tok_s']:8,.0f} {r['ttft_p50']:8.0f} ms "
            f"{r['ttft_p99']:8.0f} ms {r['hit']:10.3f}"
        )
    return "\n".join(lines)
