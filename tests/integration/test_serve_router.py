"""The router on Ray Serve: the state hub deployment, the ranked request router, cache affinity
across two engine replicas, and a replica killed while requests are queued on it."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT
from serve_helpers import serve_app

APP = "routed"


@pytest.fixture(scope="module")
def cluster(tiny_model: Path) -> Iterator[str]:
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.1, "num_threads": 1, "max_num_seqs": 2},
            "kvtier": {"enabled": False},
            # Two routers: each polls the state hub, so both send a prefix to the same replica.
            "resources": {"engine": {"replicas": 2, "num_cpus": 1}, "router": {"replicas": 2}},
            "router": {
                "routing": {"policy": "cache_aware", "max_queue_per_replica": 64, "state_interval_s": 0.05}
            },
        }
    )
    with serve_app(cfg, APP) as url:
        yield url


def _complete(url: str, prompt: list[int], max_tokens: int = 2) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": "llama-4-tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )


def test_shared_prefix_follows_the_replica_that_cached_it(cluster: str) -> None:
    rng = random.Random(3)
    system = [rng.randrange(10, 1900) for _ in range(768)]
    first = _complete(cluster, [*system, 11, 12, 13])
    assert first.status_code == 200, first.text
    time.sleep(0.5)  # its blocks reach the router through the hub (publish + poll: ~100 ms)
    replicas = set()
    for user in range(4):
        r = _complete(cluster, [*system, 20 + user, 30 + user])
        assert r.status_code == 200, r.text
        replicas.add(r.headers["x-maverick-replica"])
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 752
    assert replicas == {first.headers["x-maverick-replica"]}
    other = _complete(cluster, [rng.randrange(10, 1900) for _ in range(64)])
    assert other.status_code == 200  # a fresh prompt may go anywhere; it is still served


def test_killed_replica_requests_before_first_token_are_retried(cluster: str) -> None:
    async def stream(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        prompt = [(13 * i + j) % 1800 + 10 for j in range(400)]
        chunks, error = 0, None
        async with client.stream(
            "POST",
            f"{cluster}/v1/completions",
            json={"model": "llama-4-tiny", "prompt": prompt, "max_tokens": 96, "stream": True},
        ) as r:
            retries = int(r.headers.get("x-maverick-retries", "0"))
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    else:  # a chunk per engine output; its text may be empty (partial characters)
                        chunks += 1
            return {
                "status": r.status_code,
                "chunks": chunks,
                "error": error,
                "retries": retries,
            }

    async def scenario() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=180) as client:
            tasks = [asyncio.create_task(stream(client, i)) for i in range(16)]
            await asyncio.sleep(1.0)  # two run per replica (max_num_seqs 2), the rest wait
            victim = next(
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{APP}#{ENGINE_DEPLOYMENT}#")
            )
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
            return list(await asyncio.wait_for(asyncio.gather(*tasks), 170))  # nobody hangs

    results = asyncio.run(scenario())
    assert all(r["status"] == 200 for r in results), results  # none failed before its first token
    failed = [r for r in results if r["error"] is not None]
    assert all(r["chunks"] >= 1 for r in failed), failed  # errors only after tokens were sent
    assert sum(r["retries"] for r in results) >= 1, results  # queued ones moved to the survivor
    assert len(failed) < len(results)
