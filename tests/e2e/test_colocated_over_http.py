"""`router.colocated` behind Serve's proxy: two engine replicas that are each their own router,
through `maverick-serve up` and the real `openai` client. The app has one deployment, Serve
spreads requests over both replicas, greedy streams match plain answers on either, and a client
that leaves aborts its generation (the in-process path closes the engine stream as the Ray one
does)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conftest import MODEL_NAME, RunningCluster, assert_disconnect_aborts, launch_cluster
from maverick_serve.serving.local_cluster import dashboard_auth_headers


@pytest.fixture(scope="module")
def colocated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    config = {
        "model": {"path": str(tiny_model), "served_model_name": MODEL_NAME},
        "engine": {"kv_cache_memory_gib": 0.1, "max_model_len": 4096, "num_threads": 1},
        "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
        "router": {"colocated": True},
    }
    with launch_cluster(tiny_model, tmp_path_factory.mktemp("colocated"), config) as running:
        yield running


def test_one_deployment_takes_http(colocated: RunningCluster) -> None:
    apps = httpx.get(
        f"{colocated.dashboard_url}/api/serve/applications/", headers=dashboard_auth_headers(), timeout=30
    ).json()["applications"]
    deployments = apps["maverick"]["deployments"]
    assert set(deployments) == {"LlamaEngine"}, set(deployments)  # no Router, no state hub
    assert sum(r["state"] == "RUNNING" for r in deployments["LlamaEngine"]["replicas"]) == 2


def test_requests_spread_over_both_replicas_and_streams_match(colocated: RunningCluster) -> None:
    client = openai.OpenAI(base_url=f"{colocated.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def one(i: int) -> tuple[str, str, str]:
        prompt = f"count to {i}"
        raw = client.completions.with_raw_response.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0
        )
        plain = raw.parse().choices[0].text
        stream = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].text for c in stream if c.choices)
        return raw.headers["x-maverick-replica"], plain, streamed

    with ThreadPoolExecutor(8) as pool:  # concurrent: Serve's choice by queue length spreads them
        results = list(pool.map(one, range(16)))
    assert all(plain == streamed for _, plain, streamed in results), results
    assert len({replica for replica, _, _ in results}) == 2, results


def test_client_disconnect_aborts_engine_request(colocated: RunningCluster) -> None:
    assert_disconnect_aborts(colocated.base_url, replicas=2)
