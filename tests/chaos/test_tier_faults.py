"""Faults in the prefill and expert tiers under a steady load, counted as in test_replica_faults.

The app: one router, two engine replicas and one prefill replica (prompts of 200 tokens or more
are prefilled there and handed to a decode replica through the Redis tier), all sharing two
disaggregated expert workers. Four clients stream long prompts, four short ones. Faults:
- a prefill replica killed mid-hand-off (while its engine computes one): the hand-offs in flight
  fall back to the decode replica prefilling the prompt itself (`x-maverick-prefill: fallback`),
  and until Serve has replaced it the router sends long prompts to the engines directly
  (`self`); no request may fail, break or change its text;
- an expert worker killed: every engine fails its experts over to the surviving worker within the
  step that found it dead (`ExpertTier.fail_over`), so no stream breaks; a replacement starts in
  the dead worker's bundle, loads its experts, and the engines move them back onto it between
  steps (`experts.replace_dead_workers`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from chaos_load import Load, assert_bounds, replica_actors, run_fault, wait_replicas
from ray import serve

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.kvtier.redis_process import RedisProcess
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT, PREFILL_DEPLOYMENT
from serve_helpers import serve_app

APP = "chaos-tiers"
THRESHOLD_TOKENS = 200
WORDS = ["ray", "serve", "llama", "expert", "router", "cache", "token", "prefill", "decode", "tile"]
LONG = [f"Long client {i}: " + " ".join(WORDS[(i + k) % 10] for k in range(260)) for i in range(4)]
SHORT = [f"Short client {i}: describe a serving cluster in a few words." for i in range(4)]
PROMPTS = LONG + SHORT
LOAD_S = 30.0


@dataclass
class Cluster:
    load: Load
    experts: str  # the expert workers' actor-name prefix


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, redis_process: RedisProcess) -> Iterator[Cluster]:
    prefix = f"chaos-experts-{uuid.uuid4().hex[:6]}"
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": APP},
            "engine": {"kv_cache_memory_gib": 0.1, "num_threads": 1, "max_model_len": 2048},
            "kvtier": {"store": {"type": "redis", "url": redis_process.url}, "block_size": 16},
            "disaggregation": {
                "enabled": True,
                "threshold_tokens": THRESHOLD_TOKENS,
                "prefill": {"replicas": 1, "num_cpus": 1},
            },
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
    with serve_app(cfg, APP) as url:
        load = Load(url, APP)
        asyncio.run(load.record_reference(PROMPTS))
        assert load.prefill["ok"] == len(LONG), load.prefill  # the long prompts took the prefill path
        yield Cluster(load, prefix)


def _kill_prefill(_: Cluster) -> None:
    """Kill the prefill replica while it computes a hand-off: a prompt sits in its engine.

    `pending_prompt_tokens` is read on the replica's event loop; `stats` is not used, since the
    engine answers it between steps, when a one-token prefill has already finished (on a slow
    machine that read never saw one in flight). The actor is resolved first so that the kill
    follows the read at once."""
    (victim,) = replica_actors(APP, PREFILL_DEPLOYMENT)
    actor = ray.get_actor(victim, namespace="serve")
    handle = serve.get_deployment_handle(PREFILL_DEPLOYMENT, app_name=APP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if handle.record_autoscaling_stats.remote().result()["pending_prompt_tokens"] > 0:
            break
        time.sleep(0.005)
    else:
        raise AssertionError("the prefill replica had no hand-off in flight for 20 s")
    ray.kill(actor, no_restart=True)


def _kill_expert_worker(c: Cluster) -> None:
    actors = ray.util.list_named_actors(all_namespaces=True)
    (worker,) = [a for a in actors if a["name"] == f"{c.experts}-0"]
    ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]), no_restart=True)


def _engine_stats(field: str) -> list[int]:
    """`field` of each engine replica's stats."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP)
    seen: dict[str, int] = {}
    for _ in range(20):  # each call lands on one replica: ask until both answered
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats[field]
    return sorted(seen.values())


@dataclass
class Fault:
    inject: Callable[[Cluster], None]
    heal: Callable[[], None]
    check: Callable[[Cluster], None]  # the fault hit what it meant to


def _prefill_fell_back(c: Cluster) -> None:
    assert c.load.prefill["fallback"] > 0, c.load.prefill  # hand-offs were in flight or routed to it


def _experts_failed_over_and_back(c: Cluster) -> None:
    assert _engine_stats("expert_failovers_total") == [1, 1]  # each engine failed over once
    assert _engine_stats("expert_replacements_total") == [1, 1]  # and moved back to the new worker
    actors = ray.util.list_named_actors(all_namespaces=True)
    (worker,) = [a for a in actors if a["name"] == f"{c.experts}-0"]
    replacement = ray.get_actor(worker["name"], namespace=worker["namespace"])
    assert ray.get(replacement.ping.remote())["tokens_served"] > 0


FAULTS = {
    "prefill replica killed mid-hand-off": Fault(
        _kill_prefill, lambda: wait_replicas(APP, PREFILL_DEPLOYMENT, 1), _prefill_fell_back
    ),
    "expert worker killed (of two)": Fault(_kill_expert_worker, lambda: None, _experts_failed_over_and_back),
}
TABLE: dict[str, Counter[str]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_tier_fault_loses_no_request_and_breaks_none(cluster: Cluster, fault: str) -> None:
    spec = FAULTS[fault]
    cluster.load.prefill.clear()
    counts = run_fault(cluster.load, PROMPTS, LOAD_S, fault, lambda: spec.inject(cluster), spec.heal, TABLE)
    print(f"prefill hand-offs: {dict(cluster.load.prefill)}")
    assert_bounds(counts, len(PROMPTS), None)
    spec.check(cluster)
