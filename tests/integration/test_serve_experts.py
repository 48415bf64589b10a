"""The builder wires disaggregated experts: 2 engine replicas share 2 CPU expert workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray

from maverick_serve.config import NativeEngineConfig
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from serve_helpers import serve_app


@pytest.fixture(scope="module")
def app_url(tiny_model: Path) -> Iterator[tuple[str, str]]:
    prefix = f"serve-experts-{uuid.uuid4().hex[:6]}"
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1},
            "experts": {
                "mode": "disaggregated",
                "ep_degree": 2,
                "worker_num_cpus": 0.5,
                "worker_threads": 1,
                "name_prefix": prefix,
            },
            "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
        }
    )
    with serve_app(cfg, "ep") as url:
        yield url, prefix


def test_disaggregated_experts_serve_the_same_tokens(app_url: tuple[str, str], tiny_model: Path) -> None:
    url, prefix = app_url
    prompts = [[1920, *range(100 + 7 * i, 130 + 7 * i)] for i in range(6)]

    def ask(p: list[int]) -> list[int]:
        r = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": "llama-4-tiny",
                "prompt": p,
                "max_tokens": 10,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 0,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 10
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(ask, prompts))
    engine = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(kv_cache_memory_gib=0.05))
    expected = []
    for i, p in enumerate(prompts):
        engine.add_request(
            EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        )
        text = ""
        while engine.has_unfinished_requests():
            text += "".join(o.text_delta for o in engine.step())
        expected.append(text)
    assert served == expected
    workers = [ray.get_actor(f"{prefix}-{i}") for i in range(2)]
    served_tokens = [ray.get(w.ping.remote())["tokens_served"] for w in workers]
    assert all(n > 0 for n in served_tokens)  # both workers did expert work for the engines
    assert len(ray.util.placement_group_table()) >= 1
