"""Prefill/decode disaggregation through Serve and a real Redis: same tokens as monolithic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import torch
from ray import serve

from maverick_serve.config import NativeEngineConfig
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT, PREFILL_DEPLOYMENT
from serve_helpers import serve_app


def test_long_prompts_take_the_prefill_path_with_identical_tokens(
    tiny_model: Path, redis_server: Any
) -> None:
    long_prompt = torch.randint(0, 1900, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    short_prompt = long_prompt[:40]
    engine = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(kv_cache_memory_gib=0.05))
    expected = {}
    for name, p in (("long", long_prompt), ("short", short_prompt)):
        engine.add_request(
            EngineRequest(name, p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        )
        text = ""
        while engine.has_unfinished_requests():
            text += "".join(o.text_delta for o in engine.step())
        expected[name] = text

    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1},
            "kvtier": {
                "store": {"type": "redis", "url": redis_server.url},
                "block_size": 32,
                "required": True,
            },
            "disaggregation": {"enabled": True, "threshold_tokens": 200},
        }
    )
    with serve_app(cfg, "pd") as url:
        for name, p in (("long", long_prompt), ("short", short_prompt)):
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=120,
                json={
                    "model": "llama-4-tiny",
                    "prompt": p,
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected[name], name
        prefill = serve.get_deployment_handle(PREFILL_DEPLOYMENT, app_name="pd").stats.remote().result()
        decode = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name="pd").stats.remote().result()
        assert prefill["prompt_tokens_total"] == 300  # only the long prompt was prefilled there
        assert decode["kvtier"]["hit_tokens"] == 288  # decode loaded 9 tier blocks of 32 from Redis
        assert decode["prompt_tokens_total"] == 340
