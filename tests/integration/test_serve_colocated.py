"""`router.colocated` with autoscaling on Ray Serve, deployed from its Serve config as KubeRay
does: the engine replicas that are their own routers scale 1 → 2 under concurrent streams (the
app policy reads the engine stats the colocated replica reports), Serve's ingress then spreads
requests over both, no stream is lost, and idle brings them back to one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_serve_autoscaling import FAST, Sampler, _wait_for
from test_serve_autoscaling import stream_completion as stream

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.net import free_port
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT
from serve_helpers import serve_app

APP = "colocated"
MAX_WAVES = 30


@pytest.fixture(scope="module")
def cluster(tiny_model: Path) -> Iterator[tuple[str, Sampler]]:
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1, "max_num_seqs": 2},
            "kvtier": {"enabled": False},
            "router": {"colocated": True},
            "resources": {"engine": {"num_cpus": 1}, "check_cluster_fit": False},
            "autoscaling": {
                "enabled": True,
                "signal_window_s": 5,
                "metrics_push_interval_s": 0.5,
                "engine": {"min_replicas": 1, "max_replicas": 2, "target_per_replica": 2, **FAST},
            },
        }
    )
    dashboard = free_port()
    with serve_app(cfg, APP, dashboard_port=dashboard) as url:
        sampler = Sampler(f"http://127.0.0.1:{dashboard}", APP, (ENGINE_DEPLOYMENT,))
        yield url, sampler
        sampler.stop.set()


def test_colocated_replicas_scale_with_the_engine_tier_and_share_the_requests(
    cluster: tuple[str, Sampler],
) -> None:
    url, sampler = cluster
    assert sampler.now() == {ENGINE_DEPLOYMENT: 1, ENGINE_DEPLOYMENT + ":running": 1}

    async def load() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(base_url=url) as client:
            out: list[tuple[str, int]] = []
            wave = 0
            # Waves of 8 streams (4 per 2-slot engine) until the second replica runs, then 2 more.
            while wave < MAX_WAVES:
                out += await asyncio.gather(*(stream(client, [1, 2, wave, i], 60) for i in range(8)))
                wave += 1
                if sampler.max(ENGINE_DEPLOYMENT + ":running") >= 2:
                    break
            for extra in range(2):
                out += await asyncio.gather(*(stream(client, [3, extra, i], 60) for i in range(8)))
            return out

    results = asyncio.run(load())
    assert [tokens for _, tokens in results] == [60] * len(results)  # no stream lost or cut
    assert sampler.max(ENGINE_DEPLOYMENT) == 2, sampler.samples[-5:]  # the policy asked for 2
    assert len({replica for replica, _ in results[-16:]}) == 2, results[-16:]  # both took requests
    _wait_for(sampler, ENGINE_DEPLOYMENT + ":running", 1, 120)  # idle: back to one
