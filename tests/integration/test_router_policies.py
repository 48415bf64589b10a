"""Routing policies end to end with real engines (two in-process replicas, the state hub, the
router's ASGI app): cache affinity, image spreading, backpressure, retries after a replica dies."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from maverick_serve.serving.inprocess import InProcessCluster

MODEL = "llama-4-tiny"


def _config(model: Path, policy: str, **routing: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(model), "served_model_name": MODEL},
        "engine": {"kv_cache_memory_gib": 0.1, "max_model_len": 4096, "num_threads": 1},
        "kvtier": {"enabled": False},
        # Faster than the default so the fixed waits below cover publish + poll.
        "router": {"routing": {"policy": policy, "state_interval_s": 0.05, **routing}},
    }


def _run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


async def _complete(cluster: InProcessCluster, prompt: list[int], max_tokens: int = 1) -> dict[str, Any]:
    start = time.perf_counter()
    r = await cluster.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )
    body = r.json()
    body["_status"] = r.status_code
    body["_latency"] = time.perf_counter() - start
    body["_headers"] = dict(r.headers)
    return body


def _shared_prefix_workload() -> list[list[int]]:
    rng = random.Random(7)
    systems = [[rng.randrange(10, 1900) for _ in range(1536)] for _ in range(3)]
    # Interleaved: a system prompt comes back after the others, by which time its blocks have
    # been reported (as with many users sharing a few system prompts).
    return [systems[p] + [rng.randrange(10, 1900) for _ in range(16)] for _user in range(6) for p in range(3)]


async def _replay(model: Path, policy: str, prompts: list[list[int]]) -> tuple[float, float, Any]:
    cluster = InProcessCluster(_config(model, policy), replicas=2)
    try:
        await cluster.wait_for_state()
        results = []
        for prompt in prompts:
            results.append(await _complete(cluster, prompt))
            await asyncio.sleep(0.15)  # > publish + poll interval: the router sees the new blocks
        assert all(r["_status"] == 200 for r in results), results[0]
        cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
        total = sum(r["usage"]["prompt_tokens"] for r in results)
        ttft = statistics.mean(r["_latency"] for r in results)
        return cached / total, ttft, cluster.router.dispatcher.metrics.stats
    finally:
        await cluster.close()


def test_cache_aware_beats_round_robin_on_shared_prefixes(tiny_model: Path) -> None:
    prompts = _shared_prefix_workload()
    rr_hits, rr_ttft, _ = _run(_replay(tiny_model, "round_robin", prompts))
    ca_hits, ca_ttft, stats = _run(_replay(tiny_model, "cache_aware", prompts))
    # Round robin computes every system prompt once per replica; cache-aware once in all.
    assert ca_hits > rr_hits, (ca_hits, rr_hits)
    assert ca_ttft < rr_ttft, (ca_ttft, rr_ttft)
    assert ca_hits > 0.8 and stats.decisions[("cache_aware", "prefix")] >= 12
    # The router predicted the hits the engines then found (block keys match the engine's).
    assert stats.predicted_hit_tokens >= 0.9 * stats.actual_hit_tokens > 0


def _png(w: int, h: int, seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_heavy_workload_is_spread_by_image_cost(tiny_model: Path) -> None:
    async def scenario() -> Any:
        cluster = InProcessCluster(_config(tiny_model, "multimodal_cache_aware"), replicas=2)
        try:
            await cluster.wait_for_state()
            sizes = [(700, 700), (336, 336), (1000, 300), (336, 672), (900, 900), (400, 200)]

            async def ask(i: int) -> int:
                w, h = sizes[i % len(sizes)]
                content = [{"type": "text", "text": f"describe {i}"}]
                content += [{"type": "image_url", "image_url": {"url": _png(w, h, i)}}]
                r = await cluster.client.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": content}],
                        "max_tokens": 4,
                        "temperature": 0,
                    },
                )
                return r.status_code

            for wave in range(4):  # concurrent waves: the replicas carry equal request loads
                codes = await asyncio.gather(*(ask(wave * 6 + i) for i in range(6)))
                assert set(codes) == {200}
                await asyncio.sleep(0.1)
            return cluster.router.dispatcher.metrics.stats
        finally:
            await cluster.close()

    stats = _run(scenario())
    image_tokens = stats.image_tokens
    assert len(image_tokens) == 2 and sum(image_tokens.values()) > 0
    assert max(image_tokens.values()) <= 0.6 * sum(image_tokens.values()), dict(image_tokens)


def test_overload_answers_429_with_retry_after_not_timeouts(tiny_model: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        config = _config(tiny_model, "least_load", max_queue_per_replica=1, retry_after_s=2)
        config["engine"]["max_num_seqs"] = 1
        cluster = InProcessCluster(config, replicas=2)
        try:
            await cluster.wait_for_state()
            prompts = [[(11 * i + j) % 1800 + 10 for j in range(64)] for i in range(12)]
            return list(
                await asyncio.wait_for(
                    asyncio.gather(*(_complete(cluster, p, max_tokens=48) for p in prompts)), 120
                )
            )
        finally:
            await cluster.close()

    results = _run(scenario())
    codes = [r["_status"] for r in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
    refused = [r for r in results if r["_status"] == 429]
    # From the replicas' drain rate once measured, else router.routing.retry_after_s.
    assert all(1 <= int(r["_headers"]["retry-after"]) <= 60 for r in refused)
    assert all("max_queue_per_replica=1" in r["error"]["message"] for r in refused)


def test_requests_that_cannot_finish_in_time_get_429_up_front_not_504(tiny_model: Path) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], dict[str, float]]:
        config = _config(tiny_model, "least_load")
        config["engine"]["max_num_seqs"] = 1
        config["router"]["request_timeout_s"] = 4.0
        cluster = InProcessCluster(config, replicas=1)
        try:
            await cluster.wait_for_state()
            prompt = [(13 * j) % 1800 + 10 for j in range(64)]
            while (
                cluster.router.dispatcher.view.replicas
                and not next(iter(cluster.router.dispatcher.view.replicas.values())).load.finished_per_s
            ):  # warm up until the replica has measured its rates
                assert (await _complete(cluster, prompt, max_tokens=32))["_status"] == 200
                await asyncio.sleep(0.2)
            load = next(iter(cluster.router.dispatcher.view.replicas.values())).load
            rates = {"step_s": load.step_s, "finished_per_s": load.finished_per_s}
            burst = [[(11 * i + j) % 1800 + 10 for j in range(64)] for i in range(48)]
            results = await asyncio.gather(*(_complete(cluster, p, max_tokens=32) for p in burst))
            return list(results), rates
        finally:
            await cluster.close()

    results, rates = _run(scenario())
    codes = [r["_status"] for r in results]
    # One seat, 48 requests of 32 tokens (~0.15 s each here): the queue takes about twice the 4 s
    # deadline to drain, so roughly half must be refused up front and the rest served in time.
    assert codes.count(504) == 0, (codes, rates)
    assert codes.count(200) >= 2 and codes.count(429) >= 8, (codes, rates)
    served = [r["_latency"] for r in results if r["_status"] == 200]
    assert max(served) < 4.0
    refused = [r for r in results if r["_status"] == 429]
    assert all("within its deadline" in r["error"]["message"] for r in refused)
    assert all(int(r["_headers"]["retry-after"]) >= 1 for r in refused)


def test_dead_replica_before_first_token_is_retried_and_no_stream_hangs(tiny_model: Path) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], Any]:
        config = _config(tiny_model, "least_load", max_queue_per_replica=64)
        config["engine"]["max_num_seqs"] = 2
        cluster = InProcessCluster(config, replicas=2)
        try:
            await cluster.wait_for_state()

            async def stream(i: int) -> dict[str, Any]:
                prompt = [(7 * i + j) % 1800 + 10 for j in range(48)]
                chunks, error = 0, None  # a chunk per engine output: one or more tokens
                async with cluster.client.stream(
                    "POST",
                    "/v1/completions",
                    json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "stream": True},
                ) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"]
                        else:  # its text may be empty (the detokenizer holds partial characters)
                            chunks += 1
                return {"status": status, "chunks": chunks, "error": error}

            tasks = [asyncio.create_task(stream(i)) for i in range(10)]
            # Kill once replica-0 runs some and holds others waiting: a fixed sleep let a fast
            # moment drain its queue first, leaving nothing to retry.
            engine = cluster.replicas.servers["replica-0"].engine
            for _ in range(400):
                load = engine.load_report()
                if load.get("running", 0) >= 1 and load.get("waiting", 0) >= 1:
                    break
                await asyncio.sleep(0.005)
            else:
                pytest.fail(f"replica-0 never held waiting requests: {engine.load_report()}")
            cluster.replicas.kill("replica-0")
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)  # nobody hangs
            return list(results), cluster.router.dispatcher.metrics.stats
        finally:
            await cluster.close()

    results, stats = _run(scenario())
    assert stats.retries >= 1  # requests queued on the dead replica went to the other one
    for r in results:
        if r["status"] != 200:
            pytest.fail(f"a request failed before its first token instead of being retried: {r}")
        if r["error"] is not None:  # only streams that had started may end with an error
            assert r["chunks"] >= 1 and "mid-generation" in r["error"]["message"], r
    assert sum(r["error"] is None for r in results) >= 5


def test_deadline_answers_504_and_aborts_the_engine_request(tiny_model: Path) -> None:
    async def scenario() -> tuple[Any, list[str], list[dict[str, int]]]:
        config = _config(tiny_model, "least_load")
        config["router"]["request_timeout_s"] = 0.5
        cluster = InProcessCluster(config, replicas=2)
        try:
            await cluster.wait_for_state()
            body = {"model": MODEL, "prompt": [5] * 32, "max_tokens": 3000, "ignore_eos": True}
            start = time.perf_counter()
            plain = await cluster.client.post("/v1/completions", json=body)
            plain_s = time.perf_counter() - start
            lines = []
            async with cluster.client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
            await asyncio.sleep(0.3)  # aborts reach the engine loop
            loads = [s.engine.load_report() for s in cluster.servers]
            return (plain, plain_s), lines, loads
        finally:
            await cluster.close()

    (plain, plain_s), lines, loads = _run(scenario())
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "timeout" and plain_s < 5
    assert "request_timeout_s=0.5" in plain.json()["error"]["message"]
    errors = [json.loads(x)["error"] for x in lines if x != "[DONE]" and "error" in json.loads(x)]
    assert len(errors) == 1 and errors[0]["message"].startswith("request exceeded router.request_timeout_s")
    assert lines[-1] == "[DONE]"  # the stream ends; the client is not left hanging
    assert all(load["running"] == 0 and load["waiting"] == 0 for load in loads), loads  # aborted
