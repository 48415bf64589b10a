"""Redis frozen (SIGSTOP) for 20 s in the middle of a steady load through Serve: no request fails,
p99 TTFT stays within 2x of the same load without the fault, and tier hits return after SIGCONT
within the breaker's probe interval (max_backoff_s + probe_timeout_s)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from maverick_serve.bench.serve_bench import WORDS
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT
from serve_helpers import serve_app

pytestmark = pytest.mark.slow
CONCURRENCY = 8
FREEZE_S = 20.0
MAX_BACKOFF_S = 4.0


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(245))  # ~512 tokens of the tiny tokenizer


async def _load(url: str, until: float, seed: int) -> tuple[list[float], list[int]]:
    """Streams 512-token prompts at CONCURRENCY until `until`; TTFTs and non-200 statuses."""
    ttfts: list[float] = []
    failures: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker(wid: int) -> None:
            rng = random.Random(seed * 100 + wid)
            while time.monotonic() < until:
                body = {
                    "model": "tiny",
                    "prompt": _prompt(rng),
                    "max_tokens": 4,
                    "temperature": 0,
                    "stream": True,
                }
                started = time.monotonic()
                first = None
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        failures.append(resp.status_code)
                        await resp.aread()
                        continue
                    async for line in resp.aiter_lines():
                        if '"error"' in line:
                            failures.append(500)
                        if line.startswith("data: ") and first is None:
                            first = time.monotonic() - started
                if first is not None:
                    ttfts.append(first)

        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return ttfts, failures


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _tier_stats() -> list[dict[str, Any]]:
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name="stall")
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(20):  # Serve picks a replica per call: ask until both answered
        s = handle.stats.remote().result()
        seen[s["replica"]] = s["kvtier"]
        if len(seen) == 2:
            break
    return list(seen.values())


def test_a_frozen_redis_costs_one_timeout_not_one_per_request(tiny_model: Path, redis_server: Any) -> None:
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": "tiny"},
            "engine": {"kv_cache_memory_gib": 0.1, "num_threads": 1, "max_model_len": 2048},
            "kvtier": {
                "store": {"type": "redis", "url": redis_server.url},
                "block_size": 32,
                "breaker": {"max_backoff_s": MAX_BACKOFF_S},
            },
            "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
        }
    )
    with serve_app(cfg, "stall") as url:
        asyncio.run(_load(url, time.monotonic() + 5, seed=0))  # warm-up
        clean, clean_failures = asyncio.run(_load(url, time.monotonic() + 30, seed=1))
        pid = redis_server.proc.pid

        async def faulted() -> tuple[list[float], list[int]]:
            async def freeze() -> None:
                await asyncio.sleep(5)
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(FREEZE_S)
                os.kill(pid, signal.SIGCONT)

            load = asyncio.create_task(_load(url, time.monotonic() + 5 + FREEZE_S + 5, seed=2))
            await freeze()
            return await load

        try:
            stalled, stalled_failures = asyncio.run(faulted())
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        stats = _tier_stats()
        assert clean_failures == [] and stalled_failures == []
        assert all(s["breaker_opens"] >= 1 for s in stats), stats  # both replicas saw the stall once
        assert sum(s["breaker_skips"] for s in stats) > 10  # later lookups skipped the frozen store
        opens, skips = [s["breaker_opens"] for s in stats], [s["breaker_skips"] for s in stats]
        print(
            f"fault-free: {len(clean)} requests, p99 TTFT {_p99(clean):.3f} s; "
            f"Redis frozen {FREEZE_S:.0f} s: "
            f"{len(stalled)} requests, p99 TTFT {_p99(stalled):.3f} s, max {max(stalled):.3f} s; "
            f"breaker opens {opens}, skips {skips}"
        )
        assert _p99(stalled) <= 2 * _p99(clean), (_p99(clean), _p99(stalled), len(clean), len(stalled))
        # After SIGCONT the tier is used again: probes close both breakers and stores succeed.
        stored_before = sum(s["blocks_stored"] for s in stats)
        deadline = resumed + MAX_BACKOFF_S + 1.0 + 5.0  # probe interval + probe timeout + slack
        rng = random.Random(7)
        while True:
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": "tiny", "prompt": _prompt(rng), "max_tokens": 1},
                timeout=60,
            )
            assert r.status_code == 200
            now = _tier_stats()
            if (
                all(s["breaker_closes"] >= 1 for s in now)
                and sum(s["blocks_stored"] for s in now) > stored_before
            ):
                break
            assert time.monotonic() < deadline, f"the tier was not used again after SIGCONT: {now}"
            time.sleep(0.2)
