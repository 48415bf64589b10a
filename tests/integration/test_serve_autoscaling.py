"""Engine replicas follow load under our policy on Ray Serve: up under concurrent streams, back down
after the cooldown once idle, no request lost. A custom resource caps replicas as GPUs would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve
from serve_helpers import serve_app

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT

APP = "scaled"
SLOTS = 2  # "GPUs": at most two engine replicas fit


@pytest.fixture(scope="module")
def cluster(tiny_model: Path) -> Iterator[str]:
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.1, "num_threads": 1, "max_num_seqs": 2},
            "kvtier": {"enabled": False},
            "resources": {
                "engine": {"num_cpus": 1, "custom_resources": {"fake_gpu": 1}},
                "check_cluster_fit": False,
            },
            "autoscaling": {
                "enabled": True,
                "metrics_push_interval_s": 0.5,
                "engine": {
                    "min_replicas": 1,
                    "max_replicas": 3,  # one more than fits: the cap is the "GPUs"
                    "target_per_replica": 2,
                    "stable_window_s": 4,
                    "panic_window_s": 2,
                    "upscale_cooldown_s": 2,
                    "downscale_cooldown_s": 8,
                },
            },
        }
    )
    with serve_app(cfg, APP, resources={"fake_gpu": SLOTS}) as url:
        yield url


def _engine_replicas() -> tuple[int, int]:
    """(running replicas, Serve's target) of the engine deployment."""
    status = serve.status().applications[APP].deployments[ENGINE_DEPLOYMENT]
    running = status.replica_states.get("RUNNING", 0)
    target = status.target_num_replicas if hasattr(status, "target_num_replicas") else running
    return running, target


async def _stream(client: httpx.AsyncClient, i: int) -> int:
    body = {
        "model": "llama-4-tiny",
        "prompt": [1, 2, 3, i],
        "max_tokens": 160,
        "stream": True,
        "ignore_eos": True,
    }
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return chunks


def test_engines_scale_up_under_load_and_down_when_idle(cluster: str) -> None:
    assert _engine_replicas()[0] == 1
    seen: list[int] = []

    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=cluster) as client:
            results: list[int] = []
            for wave in range(4):  # ~4 waves of 8 concurrent streams keep running+waiting > 2 per replica
                results += await asyncio.gather(*(_stream(client, wave * 8 + i) for i in range(8)))
                seen.append(_engine_replicas()[0])
            return results

    start = time.monotonic()
    results = asyncio.run(load())
    assert all(n >= 1 for n in results) and len(results) == 32  # no request failed or was cut
    assert max(seen) == SLOTS, f"replicas seen during load: {seen}"
    assert max(seen) <= SLOTS  # the "GPU" budget caps the deployment
    # Idle: back to the minimum after the down cooldown (one step per cooldown).
    deadline = time.monotonic() + 90
    while _engine_replicas()[0] > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _engine_replicas()[0] == 1, f"still {_engine_replicas()} after {time.monotonic() - start:.0f} s"
