"""In a Serve app, expert groups follow the engine replicas (`experts.engines_per_group: 1`): two
engine replicas run two EP groups; when the app goes down to one engine replica, Serve stops a
replica, its group's workers stop with it, and the app keeps answering with the same tokens."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import ray
from ray import serve

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.experts.groups import group_worker_name, registry_name
from maverick_serve.serving.builder import build_app
from serve_helpers import actor_gone, serve_app

PROMPT = [1920, *range(100, 130)]


def _config(tiny_model: Path, prefix: str, replicas: int) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model)},
            "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1, "separate_process": False},
            "experts": {
                "mode": "disaggregated",
                "ep_degree": 2,
                "worker_num_cpus": 0.5,
                "worker_threads": 1,
                "name_prefix": prefix,
                "engines_per_group": 1,
                "group_lease_s": 90,  # longer than the test waits: groups stop because engines leave
            },
            "resources": {"engine": {"replicas": replicas, "num_cpus": 1}},
        }
    )


def _complete(url: str) -> str:
    body = {"model": "llama-4-tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_expert_groups_follow_engine_replicas_in_serve(tiny_model: Path) -> None:
    prefix = f"serve-groups-{uuid.uuid4().hex[:6]}"
    with serve_app(_config(tiny_model, prefix, 2), "groups") as url:
        first = [_complete(url) for _ in range(4)]
        x = _config(tiny_model, prefix, 2).experts
        assert x.engines_per_group is not None
        registry = ray.get_actor(registry_name(prefix, x.engines_per_group, x.group_lease_s, x.ep_degree))
        groups = ray.get(registry.groups.remote())
        assert len(groups) == 2 and all(len(m) == 1 for m in groups.values())  # a group per engine
        served = [
            ray.get(ray.get_actor(group_worker_name(g, i)).ping.remote())["tokens_served"]
            for g in groups
            for i in range(2)
        ]
        assert sum(served) > 0
        # Down to one engine replica: Serve stops replicas, each leaves its group on the way out.
        serve.run(
            build_app(_config(tiny_model, prefix, 1).model_copy(update={"app_name": "groups"})), name="groups"
        )
        started = time.monotonic()
        while time.monotonic() - started < 80 and len(ray.get(registry.groups.remote())) != 1:
            time.sleep(1)
        left = ray.get(registry.groups.remote())
        stopped = ray.get(registry.stopped_groups.remote())
        assert len(left) == 1, left
        assert stopped and not set(stopped) & set(left)
        assert all(actor_gone(group_worker_name(g, i)) for g in stopped for i in range(2))
        assert [_complete(url) for _ in range(2)] == first[:2]  # same tokens on the remaining group
