"""`router.colocated`: the router inside each engine replica. What the builder makes of it (one
ingress deployment, Serve's own replica choice, no router tier to scale or to count), the
config's refusals, the app policy reading the colocated routers' demand, and the replica itself
serving, streaming and reporting both tiers' stats without Ray."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from test_autoscaling_policies import _ctx

from maverick_serve.api.protocol import EngineWorkItem
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.types import SamplingParams
from maverick_serve.serving.builder import (
    ENGINE_DEPLOYMENT,
    PREFILL_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    STATE_HUB_DEPLOYMENT,
    TIER_OF_DEPLOYMENT,
    deployment_options,
    required_resources,
    scaled_deployments,
)

COLOCATED: dict[str, Any] = {"router": {"colocated": True}}
DISAGGREGATED: dict[str, Any] = {
    "kvtier": {"store": {"type": "redis"}},
    "disaggregation": {"enabled": True},
}


def test_one_ingress_deployment_with_serves_own_replica_choice() -> None:
    options = deployment_options(ClusterConfig.model_validate(COLOCATED))
    assert set(options) == {ENGINE_DEPLOYMENT, PREFILL_DEPLOYMENT}  # no Router, no state hub
    assert "request_router_config" not in options[ENGINE_DEPLOYMENT]  # HTTP requests carry no ranking
    apart = deployment_options(ClusterConfig())
    assert {ROUTER_DEPLOYMENT, STATE_HUB_DEPLOYMENT} <= set(apart)
    assert apart[ENGINE_DEPLOYMENT]["request_router_config"]  # the separate routers still rank


def test_no_router_tier_to_scale_or_to_place() -> None:
    scaled = {**COLOCATED, "autoscaling": {"enabled": True}}
    cfg = ClusterConfig.model_validate(scaled)
    assert cfg.scaled_tiers() == ["engine"] and scaled_deployments(cfg) == [ENGINE_DEPLOYMENT]
    options = deployment_options(cfg)
    assert options[ENGINE_DEPLOYMENT]["autoscaling_config"]["policy"]["policy_kwargs"]["tier"] == "engine"
    resources = {"resources": {"router": {"replicas": 3, "num_cpus": 2}, "engine": {"num_cpus": 1}}}
    assert required_resources(ClusterConfig.model_validate({**COLOCATED, **resources}))["CPU"] == 1
    assert required_resources(ClusterConfig.model_validate(resources))["CPU"] == 7


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"resources": {"engine": {"replicas": 2}}}, "resources.engine.replicas is 2"),
        (
            {"autoscaling": {"enabled": True, "engine": {"min_replicas": 1, "max_replicas": 3}}},
            "autoscaling.engine.max_replicas is 3",
        ),
    ],
)
def test_direct_ingress_refuses_more_than_one_colocated_replica(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ClusterConfig.model_validate({**COLOCATED, **data, "serve_runtime": {"ingress": "direct"}})
    ClusterConfig.model_validate({**COLOCATED, **data, "serve_runtime": {"ingress": "proxy"}})
    if "resources" in data:  # separate routers: engine replicas do not hold the port
        ClusterConfig.model_validate({**data, "serve_runtime": {"ingress": "direct"}})


def test_colocated_must_be_a_bool() -> None:
    with pytest.raises(ValidationError, match=r"router\.colocated"):
        ClusterConfig.model_validate({"router": {"colocated": "sometimes"}})


def test_app_policy_starts_prefill_from_the_demand_the_engine_replicas_report() -> None:
    from maverick_serve.autoscaling.serve_policy import ClusterAutoscaler

    cluster = {
        **COLOCATED,
        **DISAGGREGATED,
        "autoscaling": {
            "enabled": True,
            "prefill": {"min_replicas": 0, "max_replicas": 2, "target_per_replica": 1000.0},
        },
    }
    scaler = ClusterAutoscaler(TIER_OF_DEPLOYMENT, cluster)
    engine = {"running": {"r1": 1.0}, "waiting": {"r1": 0.0}, "prefill_tokens_per_s": {"r1": 1500.0}}
    contexts = {
        ENGINE_DEPLOYMENT: _ctx(1, None, None, metrics=engine),
        PREFILL_DEPLOYMENT: _ctx(0, None, None, name=PREFILL_DEPLOYMENT),
    }
    out, state = scaler(contexts)
    assert out == {ENGINE_DEPLOYMENT: 1, PREFILL_DEPLOYMENT: 2}  # 1500 tokens/s over 1000 per replica
    assert state[PREFILL_DEPLOYMENT]["load"] == 1500.0


async def _events(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event async for event in stream]


def test_the_replica_serves_streams_and_reports_both_tiers(tiny_model: Path) -> None:
    from maverick_serve.serving.colocated_server import ColocatedServer

    cfg = {
        "model": {"path": str(tiny_model)},
        "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1, "max_model_len": 1024},
        "kvtier": {"enabled": False},
        **COLOCATED,
    }
    server = ColocatedServer(cfg)

    async def run() -> tuple[dict[str, Any], str, httpx.Response]:
        transport = httpx.ASGITransport(app=server.build_api())
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=120) as client:
            body = {"model": "llama-4-tiny", "prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0}
            plain = (await client.post("/v1/completions", json=body)).json()
            text = ""
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            bad = await client.post("/v1/completions", json={**body, "max_tokens": 10**9})
            return plain, text, bad

    try:
        plain, streamed, bad = asyncio.run(run())
        assert plain["usage"]["completion_tokens"] == 6 and streamed == plain["choices"][0]["text"]
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        stats = asyncio.run(server.stats())
        assert stats["generated_tokens_total"] == 12 and stats["running"] == 0
        # The engine deployment's own methods answer too (handle callers), not shadowed by the router's.
        item = EngineWorkItem(
            request_id="direct-1",
            prompt_token_ids=[1, 2, 3],
            sampling=SamplingParams(max_tokens=6, temperature=0),
        ).model_dump()
        events = asyncio.run(_events(server.generate(item)))
        assert sum(len(e.get("new_token_ids") or []) for e in events) == 6, events
        assert inspect.iscoroutinefunction(server.prefill)
        reported = server.record_autoscaling_stats()
        assert {"running", "waiting", "kv_usage", "prefill_tokens_per_s"} <= set(reported)
        assert reported["prefill_tokens_per_s"] == 0.0  # the router's long-prompt demand: none here
        server.check_health()  # the engine is alive: no raise
    finally:
        server.shutdown()
