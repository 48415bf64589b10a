"""Faults under a steady load of streaming chat requests, one at a time, counted.

The app runs on a local Ray Serve (two routers, two engine replicas, the state hub, a KV tier in a
real redis-server). Eight clients stream greedy chat requests back to back; a fault hits a few
seconds in, and the load runs on until Serve has replaced what died. How each request ended is
counted as `chaos_load` says (ok, retried, broken by an error event or a connection cut, failed,
hung, wrong); the table is printed and the bounds asserted: none hung, none wrong, none failed,
none silent. The prefill and expert tiers' faults are in test_tier_faults.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from chaos_load import Load, assert_bounds, replica_actors, run_fault, wait_replicas

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.kvtier.redis_process import RedisProcess
from serve_helpers import serve_app

APP = "chaos"
CLIENTS = 8
PROMPTS = [f"Chaos client {i}: describe a serving cluster in a few words." for i in range(CLIENTS)]
LOAD_S = 30.0
REDIS_TIMEOUT_S = 1.0  # kvtier.store.socket_timeout_s of the cluster below


@dataclass
class Cluster:
    load: Load
    redis: RedisProcess


def _kill_one(deployment: str) -> Callable[[Cluster], None]:
    def fault(c: Cluster) -> None:
        victims = replica_actors(APP, deployment)
        assert victims, f"no {deployment} replica to kill"
        # The engine replica serving most streams (cache-aware routing may leave the other idle).
        victims.sort(key=lambda name: -c.load.served_by[name.rsplit("#", 1)[1]])
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)

    return fault


def _redis_stopped_then_restarted(redis: RedisProcess) -> None:
    redis.stop()
    time.sleep(5)
    redis.start()  # same port, empty: the tier refills


def _redis_frozen(redis: RedisProcess) -> None:
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(4 * REDIS_TIMEOUT_S)
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, redis_process: RedisProcess) -> Iterator[Cluster]:
    redis = redis_process
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": APP},
            "engine": {"kv_cache_memory_gib": 0.1, "num_threads": 1, "max_model_len": 2048},
            "kvtier": {
                "store": {"type": "redis", "url": redis.url, "socket_timeout_s": REDIS_TIMEOUT_S},
                "block_size": 16,
            },
            "resources": {
                "engine": {"replicas": 2, "num_cpus": 1},
                "router": {"replicas": 2, "num_cpus": 0.5},
            },
        }
    )
    with serve_app(cfg, APP) as url:
        load = Load(url, APP)
        asyncio.run(load.record_reference(PROMPTS))
        yield Cluster(load, redis)


@dataclass
class Fault:
    inject: Callable[[Cluster], None]
    heal: Callable[[], None]  # back to the fault-free shape before the next fault
    broken_end: str | None  # how streams it breaks must end; None: it must break none


FAULTS = {
    "engine replica killed": Fault(
        _kill_one("LlamaEngine"), lambda: wait_replicas(APP, "LlamaEngine", 2), "error event"
    ),
    "router replica killed (of two)": Fault(
        _kill_one("Router"), lambda: wait_replicas(APP, "Router", 2), "connection cut"
    ),
    "state hub killed": Fault(
        _kill_one("ReplicaStateHub"), lambda: wait_replicas(APP, "ReplicaStateHub", 1), None
    ),
    "Redis stopped, restarted 5 s later": Fault(
        lambda c: _redis_stopped_then_restarted(c.redis), lambda: None, None
    ),
    "Redis frozen (SIGSTOP) 4x its timeout": Fault(lambda c: _redis_frozen(c.redis), lambda: None, None),
}
TABLE: dict[str, Counter[str]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_killed_replica_loses_no_request_and_hangs_none(cluster: Cluster, fault: str) -> None:
    spec = FAULTS[fault]
    cluster.load.served_by.clear()
    counts = run_fault(cluster.load, PROMPTS, LOAD_S, fault, lambda: spec.inject(cluster), spec.heal, TABLE)
    assert_bounds(counts, CLIENTS, spec.broken_end)
