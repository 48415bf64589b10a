"""A bounded soak: a mixed load for a few minutes (`--soak-seconds`, 120 by default; longer on a
cluster you can spare) and the resources sampled all along — no growth after warm-up, every KV
block free at the end.

The mix, per client iteration (seeded): streamed text chats, image chats, long prompts, clients
that disconnect after the first token, clients that give up mid-generation (timeout), and bad
input (invalid JSON, out-of-range fields, a non-image). Prompts come from a fixed pool, so the KV
tier in Redis saturates instead of growing with every request. Sampled every few seconds: the RSS
of every Serve replica and of the proxy, the proxy's open TCP connections, the engine's KV blocks
held by requests, and Redis' used memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import redis
from PIL import Image
from ray import serve

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.kvtier.redis_process import RedisProcess
from serve_helpers import serve_app

APP = "soak"
CLIENTS = 6
SAMPLE_EVERY_S = 5.0
WARM_UP_SHARE = 0.3  # samples before this share of the run are warm-up
WORDS = ["ray", "serve", "llama", "expert", "router", "cache", "token", "prefill", "decode", "tile"]
BAD_BODIES = [
    b"{not json",
    b'{"model": "soak", "messages": [{"role": "user", "content": "x"}], "temperature": -1}',
    b'{"model": "soak", "messages": [{"role": "user", "content": [{"type": "image_url", '
    b'"image_url": {"url": "data:image/png;base64,AAAA"}}]}]}',
]


def _png(seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Samples:
    rss_mib: list[float] = field(default_factory=list)
    proxy_connections: list[int] = field(default_factory=list)
    kv_blocks_used: list[int] = field(default_factory=list)
    redis_mib: list[float] = field(default_factory=list)


def _serve_processes() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{APP}:" in cmd or "ProxyActor" in cmd:
            procs.append(p)
    return procs


def _proxy_connections() -> int:
    total = 0
    for p in _serve_processes():
        with contextlib.suppress(psutil.Error):
            if "ProxyActor" in " ".join(p.cmdline()):
                total += len([c for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED])
    return total


def _rss_mib() -> float:
    total = 0
    for p in _serve_processes():
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


async def _kv_blocks_used() -> int:
    stats = await serve.get_deployment_handle("LlamaEngine", APP).stats.remote()
    return int(sum(stats["kv_blocks_used"].values()))


async def _sampler(stop: float, samples: Samples, store: redis.Redis) -> None:
    while time.monotonic() < stop:
        # psutil and redis block: off the clients' event loop.
        samples.rss_mib.append(await asyncio.to_thread(_rss_mib))
        samples.proxy_connections.append(await asyncio.to_thread(_proxy_connections))
        samples.kv_blocks_used.append(await _kv_blocks_used())
        memory = await asyncio.to_thread(store.info, "memory")
        samples.redis_mib.append(int(memory["used_memory"]) / 2**20)
        await asyncio.sleep(SAMPLE_EVERY_S)


def _blocks_left_after(timeout_s: float) -> int:
    """KV blocks held once aborted requests have settled (polled: a slow machine takes a while)."""
    deadline = time.monotonic() + timeout_s
    while (held := asyncio.run(_kv_blocks_used())) and time.monotonic() < deadline:
        time.sleep(0.5)
    return held


async def _client(url: str, seed: int, stop: float, counts: Counter[str]) -> None:
    rng = random.Random(seed)
    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(30)) for i in range(16)]
    longs = [" ".join(random.Random(100 + i).choice(WORDS) for _ in range(700)) for i in range(3)]
    images = [_png(i) for i in range(3)]
    chat = f"{url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < stop:
            kind = rng.choices(
                ["text", "image", "long", "disconnect", "give up", "bad"], [45, 15, 10, 10, 10, 10]
            )[0]
            body: dict = {"model": APP, "max_tokens": 12, "temperature": 0}
            try:
                if kind == "text":
                    body |= {"messages": [{"role": "user", "content": rng.choice(texts)}], "stream": True}
                    async with client.stream("POST", chat, json=body) as r:
                        text = await r.aread()
                    # An error event is followed by [DONE] too: a served stream has none.
                    ok = (
                        r.status_code == 200 and text.endswith(b"data: [DONE]\n\n") and b'"error"' not in text
                    )
                elif kind == "image":
                    content = [
                        {"type": "image_url", "image_url": {"url": rng.choice(images)}},
                        {"type": "text", "text": rng.choice(texts)},
                    ]
                    r = await client.post(
                        chat, json=body | {"messages": [{"role": "user", "content": content}]}
                    )
                    ok = r.status_code == 200
                elif kind == "long":
                    r = await client.post(
                        f"{url}/v1/completions", json=body | {"prompt": rng.choice(longs), "max_tokens": 4}
                    )
                    ok = r.status_code == 200
                elif kind == "disconnect":  # first token, then gone
                    body |= {"messages": [{"role": "user", "content": rng.choice(texts)}], "stream": True}
                    body |= {"max_tokens": 200, "ignore_eos": True}
                    async with client.stream("POST", chat, json=body) as r:
                        async for line in r.aiter_lines():
                            if '"content":"' in line and '"content":""' not in line:
                                break
                    ok = r.status_code == 200
                elif kind == "give up":  # the client's timeout ends it mid-generation
                    body |= {"messages": [{"role": "user", "content": rng.choice(texts)}]}
                    body |= {"max_tokens": 400, "ignore_eos": True}
                    with contextlib.suppress(httpx.TimeoutException):
                        await client.post(chat, json=body, timeout=0.5)
                    ok = True
                else:
                    bad = rng.choice(BAD_BODIES)
                    r = await client.post(chat, content=bad, headers={"content-type": "application/json"})
                    ok = r.status_code == 400
            except httpx.HTTPError:
                ok = False
            counts[kind if ok else f"{kind}: unexpected"] += 1


def _settled(values: list[float]) -> tuple[float, float]:
    """(median just after warm-up, median of the last third)."""
    start = int(len(values) * WARM_UP_SHARE)
    early = values[start : start + max(1, len(values) // 5)]
    late = values[-max(1, len(values) // 3) :]
    return statistics.median(early), statistics.median(late)


@pytest.fixture(scope="module")
def soak_cluster(tiny_model: Path, redis_process: RedisProcess) -> Iterator[tuple[str, RedisProcess]]:
    store = redis_process
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": APP},
            "engine": {"kv_cache_memory_gib": 0.1, "num_threads": 1, "max_model_len": 4096},
            "kvtier": {"store": {"type": "redis", "url": store.url}, "block_size": 16},
            "router": {"max_images_per_request": 2},
        }
    )
    with serve_app(cfg, APP) as url:
        yield url, store


@pytest.mark.slow
def test_a_mixed_soak_holds_its_resources_flat_and_frees_every_kv_block(
    soak_cluster: tuple[str, RedisProcess], request: pytest.FixtureRequest
) -> None:
    url, store = soak_cluster
    seconds = float(request.config.getoption("--soak-seconds"))
    client = redis.Redis.from_url(store.url)
    counts: Counter[str] = Counter()
    samples = Samples()

    async def soak() -> None:
        stop = time.monotonic() + seconds
        await asyncio.gather(
            _sampler(stop, samples, client), *(_client(url, seed, stop, counts) for seed in range(CLIENTS))
        )

    asyncio.run(soak())
    blocks_left = _blocks_left_after(30)
    rss = _settled(samples.rss_mib)
    conns = _settled([float(c) for c in samples.proxy_connections])
    tier = _settled(samples.redis_mib)
    print(f"\nsoak {seconds:g} s, {CLIENTS} clients: {dict(sorted(counts.items()))}")
    print(f"RSS of replicas + proxy: {rss[0]:.0f} → {rss[1]:.0f} MiB")
    print(f"proxy connections: {conns[0]:g} → {conns[1]:g}")
    print(f"Redis used memory: {tier[0]:.1f} → {tier[1]:.1f} MiB")
    print(f"KV blocks held by requests: peak {max(samples.kv_blocks_used)}, at the end {blocks_left}")
    assert not [k for k in counts if k.endswith("unexpected")], counts
    assert all(counts[k] > 0 for k in ("text", "image", "long", "disconnect", "give up", "bad")), counts
    assert len(samples.rss_mib) >= 6, "too few samples to judge growth"
    assert rss[1] <= max(rss[0] * 1.15, rss[0] + 64), f"RSS grew {rss[0]:.0f} → {rss[1]:.0f} MiB"
    assert conns[1] <= conns[0] + CLIENTS, f"proxy connections grew {conns[0]} → {conns[1]}"
    assert tier[1] <= max(tier[0] * 1.2, tier[0] + 8), f"Redis memory grew {tier[0]:.1f} → {tier[1]:.1f} MiB"
    assert blocks_left == 0, f"{blocks_left} KV blocks still held after the load ended"
