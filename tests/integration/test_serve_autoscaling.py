"""Every tier follows its load under our app-level policy on Ray Serve, deployed from its Serve
config as KubeRay does: engines and routers scale up under concurrent streams and back down when
idle, prefill goes 0 → N → 0 under long prompts, streams on a draining replica finish, no request
fails, and the "GPUs" (a custom resource that caps placement as GPUs would) never exceed the budget."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.kvtier.redis_process import RedisProcess
from maverick_serve.net import free_port
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT, PREFILL_DEPLOYMENT, ROUTER_DEPLOYMENT
from maverick_serve.serving.local_cluster import dashboard_auth_headers
from serve_helpers import serve_app

APP = "scaled"
BUDGET = 3  # "GPUs" shared by engine and prefill replicas (one each)
MAX_WAVES = 30
FAST = {"stable_window_s": 4, "panic_window_s": 2, "upscale_cooldown_s": 2, "downscale_cooldown_s": 6}


class Sampler:
    """Every tier's Serve target and replica states, twice a second, for the whole test (from the
    dashboard's REST API, as `maverick-serve status` reads them)."""

    def __init__(
        self,
        dashboard: str,
        app: str = APP,
        deployments: tuple[str, ...] = (ROUTER_DEPLOYMENT, ENGINE_DEPLOYMENT, PREFILL_DEPLOYMENT),
    ) -> None:
        self.url = f"{dashboard}/api/serve/applications/"
        self.app, self.deployments = app, deployments
        self.samples: list[dict[str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now(self) -> dict[str, int]:
        apps = httpx.get(self.url, timeout=10, headers=dashboard_auth_headers()).json()["applications"]
        deps = apps[self.app]["deployments"]
        out = {}
        for name in self.deployments:
            out[name] = int(deps[name]["target_num_replicas"])
            out[name + ":running"] = sum(1 for r in deps[name]["replicas"] if r["state"] == "RUNNING")
        return out

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            with contextlib.suppress(Exception):  # the controller busy: skip one sample
                self.samples.append(self.now())

    def max(self, key: str) -> int:
        return max((s[key] for s in self.samples), default=0)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Sampler]]:
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    redis.start()
    gpu = {"custom_resources": {"fake_gpu": 1}}
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1, "max_num_seqs": 2},
            "kvtier": {"store": {"type": "redis", "url": redis.url}, "block_size": 32},
            "disaggregation": {"enabled": True, "threshold_tokens": 200, "prefill": {"num_cpus": 1, **gpu}},
            "resources": {
                "router": {"num_cpus": 0.5},
                "engine": {"num_cpus": 1, **gpu, "graceful_shutdown_timeout_s": 120},
                "check_cluster_fit": False,
            },
            "autoscaling": {
                "enabled": True,
                "signal_window_s": 5,
                "metrics_push_interval_s": 0.5,
                "gpu_budget": BUDGET,
                "budget_resource": "fake_gpu",
                "router": {"min_replicas": 1, "max_replicas": 2, "target_per_replica": 4, **FAST},
                "engine": {"min_replicas": 1, "max_replicas": 3, "target_per_replica": 2, **FAST},
                "prefill": {"min_replicas": 0, "max_replicas": 2, "target_per_replica": 150, **FAST},
            },
        }
    )
    # One "GPU" more than the budget: the policy, not placement, must keep the tiers inside it.
    dashboard = free_port()
    with serve_app(cfg, APP, resources={"fake_gpu": BUDGET + 1}, dashboard_port=dashboard) as url:
        sampler = Sampler(f"http://127.0.0.1:{dashboard}")
        yield url, sampler
        sampler.stop.set()
    redis.stop()


async def stream_completion(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    """(replica that served it, completion tokens) of one streamed completion."""
    body = {
        "model": "llama-4-tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    tokens = -1
    async with client.stream("POST", "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"usage"' in line and '"completion_tokens"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return r.headers.get("x-maverick-replica", ""), tokens


async def _stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> int:
    return (await stream_completion(client, prompt, max_tokens))[1]


def _wait_for(sampler: Sampler, key: str, value: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if sampler.now()[key] == value:
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{key} did not reach {value} in {timeout_s:.0f} s: {sampler.now()}")


def _both_scaled_up(sampler: Sampler) -> bool:
    return all(sampler.max(tier + ":running") >= 2 for tier in (ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT))


def test_engines_and_routers_scale_up_and_down_without_losing_a_stream(cluster: tuple[str, Any]) -> None:
    url, sampler = cluster
    assert sampler.now()[ENGINE_DEPLOYMENT + ":running"] == 1
    assert sampler.now()[PREFILL_DEPLOYMENT] == 0  # prefill starts at zero

    async def load() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=url) as client:
            burst: list[int] = []
            # Waves of 12 concurrent short streams (~6 per the 2-slot engines) until an added engine
            # replica and an added router run: on 2 busy cores a new replica's worker (and engine
            # process) take 20-40 s to start, longer than a fixed burst the engines may finish
            # first, and the two tiers' new replicas come up in either order.
            wave = 0
            while wave < 4 or (not _both_scaled_up(sampler) and wave < MAX_WAVES):
                burst += await asyncio.gather(*(_stream(client, [1, 2, 3, wave, i], 120) for i in range(12)))
                wave += 1
            # Long streams across the scale-down: some run on replicas Serve drains and stops.
            tail = await asyncio.gather(*(_stream(client, [5, 6, i], 600) for i in range(3)))
            return burst, tail

    start = time.monotonic()
    burst, tail = asyncio.run(load())
    assert burst == [120] * len(burst) and len(burst) % 12 == 0, burst  # all its tokens, each stream
    assert tail == [600] * 3, tail
    assert sampler.max(ENGINE_DEPLOYMENT + ":running") >= 2, sampler.samples[-5:]
    # Routers followed the requests (the target says whether the policy or the placement lagged).
    assert sampler.max(ROUTER_DEPLOYMENT + ":running") == 2, (sampler.max(ROUTER_DEPLOYMENT), len(burst))
    # Idle: back to the minimums after the down cooldown (one step per cooldown).
    _wait_for(sampler, ENGINE_DEPLOYMENT + ":running", 1, 120)
    _wait_for(sampler, ROUTER_DEPLOYMENT + ":running", 1, 60)
    print(f"engines up and back down in {time.monotonic() - start:.0f} s")


def test_prefill_starts_from_zero_under_long_prompts_and_returns_to_zero(cluster: tuple[str, Any]) -> None:
    url, sampler = cluster
    assert sampler.now()[PREFILL_DEPLOYMENT] == 0

    async def long_prompts() -> tuple[list[int], float]:
        """4 concurrent 300-token prompts at a time (several hundred tokens/s against 150 per
        replica), until prefill replicas run and have served a few waves."""
        async with httpx.AsyncClient(base_url=url) as client:
            out: list[int] = []
            start, started_at, wave = time.monotonic(), None, 0
            while time.monotonic() - start < 150:
                prompts = [[(7 * wave + 13 * i + j) % 1900 for j in range(300)] for i in range(4)]
                out += await asyncio.gather(*(_stream(client, p, 16) for p in prompts))
                wave += 1
                if started_at is None and sampler.now()[PREFILL_DEPLOYMENT + ":running"] >= 1:
                    started_at = time.monotonic() - start
                if started_at is not None and time.monotonic() - start > started_at + 5:
                    break
            assert started_at is not None, f"prefill never started: {sampler.samples[-3:]}"
            return out, started_at

    results, started_at = asyncio.run(long_prompts())
    assert results == [16] * len(results), results  # none failed, with or without prefill replicas
    print(f"prefill 0 -> {sampler.max(PREFILL_DEPLOYMENT + ':running')} in {started_at:.0f} s")
    prefilled = serve.get_deployment_handle(PREFILL_DEPLOYMENT, app_name=APP).stats.remote().result()
    assert prefilled["prompt_tokens_total"] >= 300  # long prompts went through the prefill tier
    _wait_for(sampler, PREFILL_DEPLOYMENT + ":running", 0, 90)


def test_the_gpu_budget_was_never_exceeded(cluster: tuple[str, Any]) -> None:
    """Serve's targets (what the policy asked for) stay inside the budget at every sample. A
    replica draining after a scale-down still holds its "GPU" for a while; what the next tier
    asks for meanwhile waits for placement (on KubeRay, the worker groups' maxReplicas)."""
    _, sampler = cluster
    assert len(sampler.samples) > 100, "too few samples"
    peak = max(s[ENGINE_DEPLOYMENT] + s[PREFILL_DEPLOYMENT] for s in sampler.samples)
    assert peak == BUDGET, peak  # reached under load, never above
