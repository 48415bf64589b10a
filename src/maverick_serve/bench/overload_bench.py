"""`maverick-serve bench overload`: offered load from below to far past capacity, goodput per level.

One local cluster (`maverick-serve up`) whose `router.request_timeout_s` is the clients' deadline,
so admission by predicted wait knows what "in time" means. First a closed loop at a fixed
concurrency measures capacity (requests/s); then, per level, an open loop sends Poisson arrivals
at factor × capacity for a fixed time. Per level: goodput (requests whose last byte arrived
within the deadline, per second of the level), the share answered 429, other errors, and TTFT
p50/p99 of the served ones. Past capacity a server that queues everything lets every request's
latency grow until few finish in time (goodput falls); one that refuses up front what cannot
finish keeps serving capacity's worth in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from maverick_serve.bench.serve_bench import WORDS, pct
from maverick_serve.serving.up_process import run_up


@dataclass
class Workload:
    prompt_words: int
    max_tokens: int
    deadline_s: float


@dataclass
class LevelFigures:
    factor: float
    offered_rps: float
    seconds: float
    sent: int = 0
    in_time: int = 0
    late: int = 0
    refused: int = 0  # 429
    errors: int = 0  # anything else that was not a served answer
    ttft_s: list[float] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)  # HTTP status or exception name

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1

    @property
    def goodput_rps(self) -> float:
        return self.in_time / self.seconds

    @property
    def refused_share(self) -> float:
        return self.refused / self.sent if self.sent else 0.0


def _body(model: str, rng: random.Random, work: Workload) -> dict[str, Any]:
    text = " ".join(rng.choice(WORDS) for _ in range(work.prompt_words))
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"{rng.random():.6f} {text}"}],  # no shared prefix
        "max_tokens": work.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def _one(client: httpx.AsyncClient, body: dict[str, Any], work: Workload, level: LevelFigures) -> None:
    level.sent += 1
    start = time.perf_counter()
    ttft = None
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, timeout=work.deadline_s + 30
        ) as r:
            if r.status_code == 429:
                await r.aread()
                level.refused += 1
                return
            if r.status_code != 200:
                await r.aread()
                level.error(str(r.status_code))
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    level.error(f"error event {chunk['error'].get('code') or ''}".strip())
                    return
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        level.error(type(exc).__name__)
        return
    if not done:
        level.error("stream without [DONE]")
        return
    if ttft is not None:
        level.ttft_s.append(ttft)
    if time.perf_counter() - start <= work.deadline_s:
        level.in_time += 1
    else:
        level.late += 1


async def measure_capacity(url: str, model: str, work: Workload, concurrency: int, requests: int) -> float:
    """Requests per second a closed loop of `concurrency` clients gets served."""
    rng = random.Random(0)
    probe = LevelFigures(0.0, 0.0, 1.0)
    async with httpx.AsyncClient(
        base_url=url, limits=httpx.Limits(max_connections=concurrency * 2)
    ) as client:
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await _one(client, _body(model, rng, work), work, probe)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    served = probe.in_time + probe.late
    if served == 0:
        raise RuntimeError(f"capacity probe: none of {requests} requests was served ({probe})")
    return served / wall


async def offer(
    url: str, model: str, work: Workload, factor: float, rps: float, seconds: float, seed: int
) -> LevelFigures:
    """Poisson arrivals at `rps` for `seconds`; waits for every request sent to end."""
    level = LevelFigures(factor, rps, seconds)
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        start = time.perf_counter()
        next_at = 0.0
        while True:
            next_at += rng.expovariate(rps)
            if next_at >= seconds:
                break
            await asyncio.sleep(max(0.0, start + next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(client, _body(model, rng, work), work, level)))
        await asyncio.gather(*tasks)
    return level


def cluster_config(model_dir: Path, deadline_s: float, replicas: int, threads: int) -> dict[str, Any]:
    return {
        "model": {"path": str(model_dir)},
        "engine": {"kv_cache_memory_gib": 0.2, "max_model_len": 4096, "num_threads": threads},
        "router": {"request_timeout_s": deadline_s},
        "resources": {"engine": {"replicas": replicas, "num_cpus": 1}},
    }


def run(
    model_dir: Path,
    work: Workload,
    factors: list[float],
    seconds: float,
    replicas: int,
    threads: int,
    capacity_concurrency: int,
    progress: Callable[[str], None] = print,
) -> tuple[float, list[LevelFigures]]:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-overload-")))
        progress(f"starting the cluster (router.request_timeout_s = {work.deadline_s:g} s) ...")
        up = stack.enter_context(run_up(cluster_config(model_dir, work.deadline_s, replicas, threads), tmp))
        model = httpx.get(f"{up.api_url}/v1/models", timeout=10).json()["data"][0]["id"]
        progress("warm-up and capacity: a closed loop ...")
        asyncio.run(measure_capacity(up.api_url, model, work, capacity_concurrency, capacity_concurrency))
        capacity = asyncio.run(
            measure_capacity(up.api_url, model, work, capacity_concurrency, capacity_concurrency * 4)
        )
        levels = []
        for i, factor in enumerate(factors):
            progress(f"offering {factor:g} x capacity ({factor * capacity:.2f} req/s) for {seconds:g} s ...")
            levels.append(
                asyncio.run(offer(up.api_url, model, work, factor, factor * capacity, seconds, seed=i))
            )
    return capacity, levels


def format_table(capacity: float, levels: list[LevelFigures], work: Workload) -> str:
    lines = [
        f"capacity (closed loop): {capacity:.2f} req/s; prompt ~{work.prompt_words} words, "
        f"{work.max_tokens} tokens out, deadline {work.deadline_s:g} s",
        "",
        "| offered | req/s | sent | goodput req/s | vs capacity | in time | late | 429 share | errors "
        "| TTFT p50 | TTFT p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        lines.append(
            f"| {lv.factor:g}x | {lv.offered_rps:.2f} | {lv.sent} | {lv.goodput_rps:.2f} | "
            f"{lv.goodput_rps / capacity:.2f} | {lv.in_time} | {lv.late} | {lv.refused_share:.0%} | "
            f"{lv.errors} | {pct(lv.ttft_s, 0.5) * 1000:.0f} ms | {pct(lv.ttft_s, 0.99) * 1000:.0f} ms |"
        )
    kinds = [f"{lv.factor:g}x: {dict(lv.error_kinds)}" for lv in levels if lv.error_kinds]
    if kinds:
        lines += ["", "errors by kind: " + "; ".join(kinds)]
    # Past capacity goodput should hold at capacity's: compare each level above 1x with it (at
    # 1x and below, goodput is bounded by what is offered, not by the server).
    past = [lv for lv in levels if lv.factor > 1]
    if past:
        worst = min(past, key=lambda lv: lv.goodput_rps)
        lines += [
            "",
            f"goodput past capacity: lowest {worst.goodput_rps / capacity:.2f} x capacity, at "
            f"{worst.factor:g}x (1.00 or more: it does not fall)",
        ]
    return "\n".join(lines)
