"""Faults under a steady load of streaming chat requests, one at a time, counted.

The app runs on a local Ray Serve (two routers, two engine replicas, the state hub, a KV tier in a
real redis-server). Eight clients stream greedy
chat requests back to back; a fault hits a few seconds in, and the load runs on until Serve has
replaced what died. Each request ends as one of:
- ok: `[DONE]` with the fault-free run's text;
- retried: failed before its first token (5xx, connection cut) and succeeded on a client retry, as
  the OpenAI client retries; a router-side retry before the first token counts here too
  (`x-maverick-retries`);
- broken: cut after its first token. It must end with an error event when an engine replica dies
  (the router is alive to send one); when the router replica itself dies, Serve's proxy drops the
  connection mid-body (an incomplete chunked response, which HTTP clients raise). Never silent:
  a clean end without `[DONE]` counts apart and must not happen;
- failed: never succeeded before its first token within 4 attempts;
- hung: no end within its deadline;
- wrong: finished with a text that differs from the fault-free run.
The table is printed; the bounds are asserted: none hung, none wrong, none failed, none silent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.kvtier.redis_process import RedisProcess
from serve_helpers import serve_app

APP = "chaos"
CLIENTS = 8
PROMPTS = [f"Chaos client {i}: describe a serving cluster in a few words." for i in range(CLIENTS)]
MAX_TOKENS = 24
DEADLINE_S = 90.0  # per request, retries included
FAULT_AT_S = 5.0
LOAD_S = 30.0
ATTEMPTS = 4


@dataclass
class Outcome:
    kind: str  # ok | retried | broken | failed | hung | wrong
    how: str = ""  # of a broken one: error event | connection cut | silent


REDIS_TIMEOUT_S = 1.0  # kvtier.store.socket_timeout_s of the cluster below


@dataclass
class Cluster:
    url: str
    reference: dict[str, str]
    redis: RedisProcess


class _BeforeFirstToken(Exception):
    pass


SERVED_BY: Counter[str] = Counter()  # engine replica id → streams it served lately (x-maverick-replica)


async def _stream_once(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[str, bool, int, str]:
    """One attempt: (text, finished with [DONE], router retries, how it broke if it did).
    Raises _BeforeFirstToken when it failed before any token arrived."""
    body = {
        "model": APP,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, first = "", False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise _BeforeFirstToken(f"{r.status_code}: {r.text[:200]}")
            retries = int(r.headers.get("x-maverick-retries", "0"))
            SERVED_BY[r.headers.get("x-maverick-replica", "")] += 1
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return text, True, retries, ""
                event = json.loads(data)
                if "error" in event:
                    if not first:
                        raise _BeforeFirstToken(event["error"]["message"])
                    return text, False, retries, "error event"
                choices = event["choices"]  # the usage chunk has none
                delta = (choices[0]["delta"].get("content") or "") if choices else ""
                first = first or bool(delta)
                text += delta
    except httpx.TransportError as exc:
        if not first:
            raise _BeforeFirstToken(repr(exc)) from exc
        return text, False, 0, "connection cut"
    if not first:
        raise _BeforeFirstToken("stream ended before its first token")
    return text, False, 0, "silent"


async def _request(client: httpx.AsyncClient, url: str, prompt: str, reference: dict[str, str]) -> Outcome:
    retried = False
    for attempt in range(ATTEMPTS):
        try:
            text, done, router_retries, how = await _stream_once(client, url, prompt)
        except _BeforeFirstToken:
            retried = True
            await asyncio.sleep(0.5 * 2**attempt)
            continue
        if not done:
            return Outcome("broken", how)
        if text != reference.get(prompt, text):
            return Outcome("wrong")
        return Outcome("retried" if retried or router_retries else "ok")
    return Outcome("failed")


async def _load(
    url: str, reference: dict[str, str], seconds: float, fault: Callable[[], None] | None
) -> Counter[str]:
    counts: Counter[str] = Counter()
    stop = time.monotonic() + seconds

    async def client_loop(prompt: str) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(DEADLINE_S, connect=10)) as client:
            while time.monotonic() < stop:
                try:
                    outcome = await asyncio.wait_for(_request(client, url, prompt, reference), DEADLINE_S)
                except TimeoutError:
                    outcome = Outcome("hung")
                counts[outcome.kind] += 1
                if outcome.kind == "broken":
                    counts[f"broken: {outcome.how}"] += 1

    async def injector() -> None:
        if fault is not None:
            await asyncio.sleep(FAULT_AT_S)
            await asyncio.to_thread(fault)

    await asyncio.gather(injector(), *(client_loop(p) for p in PROMPTS))
    return counts


def _replica_actors(deployment: str) -> list[str]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return sorted(n for n in names if f"{APP}#{deployment}#" in n)


def _kill_one(deployment: str) -> Callable[[Cluster], None]:
    def fault(_: Cluster) -> None:
        victims = _replica_actors(deployment)
        assert victims, f"no {deployment} replica to kill"
        # The engine replica serving most streams (cache-aware routing may leave the other idle).
        victims.sort(key=lambda name: -SERVED_BY[name.rsplit("#", 1)[1]])
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


def _wait_replicas(deployment: str, count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments[deployment]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == count:
            return
        time.sleep(1)
    raise AssertionError(f"{deployment} did not get back to {count} running replicas in {timeout_s} s")


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
        reference: dict[str, str] = {}

        async def fault_free() -> None:
            async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
                for p in PROMPTS:
                    text, done, _, _ = await _stream_once(client, url, p)
                    assert done and text
                    reference[p] = text

        asyncio.run(fault_free())
        yield Cluster(url, reference, redis)


@dataclass
class Fault:
    inject: Callable[[Cluster], None]
    heal: Callable[[], None]  # back to the fault-free shape before the next fault
    broken_end: str | None  # how streams it breaks must end; None: it must break none


FAULTS = {
    "engine replica killed": Fault(
        _kill_one("LlamaEngine"), lambda: _wait_replicas("LlamaEngine", 2), "error event"
    ),
    "router replica killed (of two)": Fault(
        _kill_one("Router"), lambda: _wait_replicas("Router", 2), "connection cut"
    ),
    "state hub killed": Fault(
        _kill_one("ReplicaStateHub"), lambda: _wait_replicas("ReplicaStateHub", 1), None
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
    SERVED_BY.clear()
    counts = asyncio.run(_load(cluster.url, cluster.reference, LOAD_S, lambda: spec.inject(cluster)))
    spec.heal()
    TABLE[fault] = counts
    kinds = ["ok", "retried", "broken", "broken: error event", "broken: connection cut", "broken: silent"]
    kinds += ["failed", "hung", "wrong"]
    print(f"\n{'fault':<38}" + "".join(f"{k:>{len(k) + 2}}" for k in kinds))
    for name, c in TABLE.items():
        print(f"{name:<38}" + "".join(f"{c[k]:>{len(k) + 2}}" for k in kinds))
    served = counts["ok"] + counts["retried"]
    assert served >= CLIENTS, counts  # the load kept going through the fault
    assert counts["hung"] == 0 and counts["wrong"] == 0 and counts["failed"] == 0, counts
    if spec.broken_end is None:
        assert counts["broken"] == 0, counts
    else:  # the killed replica had work in flight, or the test proved nothing
        assert counts["broken"] + counts["retried"] > 0, counts
        assert counts["broken: silent"] == 0 and counts[f"broken: {spec.broken_end}"] == counts["broken"], (
            counts
        )
