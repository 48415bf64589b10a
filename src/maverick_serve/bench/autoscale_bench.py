"""`maverick-serve bench autoscale`: one bursty trace against four ways of sizing the engine tier.

Each variant gets a fresh local Ray + Serve (a custom resource, `fake_gpu`, caps engine replicas
as GPUs would) deployed from its Serve config, then the same open-loop trace of streamed
completions (Poisson arrivals at the trace's rate per phase). Variants: fixed at the minimum,
fixed at the maximum, Serve's default ongoing-requests policy, and ours. Figures: SLO
attainment (share of requests whose TTFT is within the target), engine replica-seconds over the
trace, time from the first burst to the first added replica, failed requests. A PNG shows load
and replicas over time per variant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from maverick_serve.bench.serve_bench import pct
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.net import free_port
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT, serve_application
from maverick_serve.serving.local_cluster import dashboard_auth_headers, put_serve_config, wait_ready

VARIANTS = ("fixed-min", "fixed-max", "serve-default", "maverick", "maverick-learned")
# (seconds, requests per second): quiet, burst, quiet, burst, quiet.
DEFAULT_TRACE = ((15.0, 0.5), (40.0, 4.0), (30.0, 0.5), (30.0, 4.0), (25.0, 0.5))


@dataclass
class RequestRecord:
    start_s: float
    ttft_s: float | None = None
    ok: bool = False
    status: int = 0  # HTTP status (0: connection error)


@dataclass
class VariantResult:
    name: str
    records: list[RequestRecord] = field(default_factory=list)
    # t, requests in flight, engines running, routers running, engines Serve's target
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    trace_s: float = 0.0
    first_burst_s: float = 0.0
    min_replicas: int = 1

    def attainment(self, slo_s: float) -> float:
        if not self.records:
            return float("nan")
        good = sum(1 for r in self.records if r.ok and r.ttft_s is not None and r.ttft_s <= slo_s)
        return good / len(self.records)

    def replica_seconds(self) -> float:
        total, prev = 0.0, None
        for t, _, engines, _, _ in self.samples:
            if prev is not None and t <= self.trace_s:
                total += (t - prev[0]) * prev[1]
            prev = (t, engines)
        return total

    def time_to_scale_up(self, key: int = 2) -> float | None:
        """Seconds from the first burst to the first added replica: running (key 2) or asked
        for (key 4, the policy's decision)."""
        for sample in self.samples:
            if sample[0] >= self.first_burst_s and sample[key] > self.min_replicas:
                return sample[0] - self.first_burst_s
        return None

    def failed(self) -> int:
        return sum(1 for r in self.records if not r.ok)

    def failures_by_status(self) -> str:
        counts: dict[int, int] = {}
        for r in self.records:
            if not r.ok:
                counts[r.status] = counts.get(r.status, 0) + 1
        return ", ".join(f"{n}×{code or 'conn'}" for code, n in sorted(counts.items())) or "0"


def variant_config(
    base: ClusterConfig, variant: str, lo: int, hi: int, slo_ttft_s: float = 1.0
) -> tuple[ClusterConfig, dict[str, Any]]:
    """The ClusterConfig and the Serve config body of one variant. `maverick-learned` is ours
    with the engine's target learned against the TTFT SLO, judged every 2 latency windows (the
    shortest the config allows) so that a short trace sees it move."""
    tier = base.autoscaling.engine.model_copy(update={"min_replicas": lo, "max_replicas": hi})
    if variant == "maverick-learned":
        learn = tier.learn_capacity.model_copy(
            update={
                "enabled": True,
                "interval_s": 2 * base.autoscaling.signal_window_s,
                "min_target": min(0.5, tier.target_per_replica),
                "max_target": max(16.0, tier.target_per_replica),
            }
        )
        tier = tier.model_copy(update={"slo_ttft_p95_s": slo_ttft_s, "learn_capacity": learn})
    scaling = base.autoscaling.model_copy(update={"engine": tier})
    if variant in ("fixed-min", "fixed-max"):
        replicas = lo if variant == "fixed-min" else hi
        engine = base.resources.engine.model_copy(update={"replicas": replicas})
        cfg = base.model_copy(
            update={
                "resources": base.resources.model_copy(update={"engine": engine}),
                "autoscaling": scaling.model_copy(update={"enabled": False}),
            }
        )
    else:
        cfg = base.model_copy(update={"autoscaling": scaling.model_copy(update={"enabled": True})})
    cfg = ClusterConfig.model_validate(cfg.model_dump())
    app = serve_application(cfg)
    if variant == "serve-default":
        # Serve's own policy on the engines (a config override replaces the code's autoscaling
        # options), with delays as short as our cooldowns so the comparison is about the policy.
        app.pop("autoscaling_policy", None)
        app["deployments"] = [
            {
                "name": ENGINE_DEPLOYMENT,
                "autoscaling_config": {
                    "min_replicas": lo,
                    "max_replicas": hi,
                    "initial_replicas": lo,
                    "target_ongoing_requests": max(1.0, tier.target_per_replica / 2),
                    "upscale_delay_s": tier.upscale_cooldown_s,
                    "downscale_delay_s": tier.downscale_cooldown_s,
                    "look_back_period_s": max(tier.panic_window_s, 10.5),
                },
            }
        ]
    body = {"http_options": {"host": cfg.http.host, "port": cfg.http.port}, "applications": [app]}
    return cfg, body


class _Sampler:
    def __init__(self, dashboard: str, app: str, in_flight: list[int], t0: float) -> None:
        self.url = f"{dashboard}/api/serve/applications/"
        self.app, self.in_flight, self.t0 = app, in_flight, t0
        self.samples: list[tuple[float, int, int, int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _running(self, deps: dict[str, Any], name: str) -> int:
        return sum(1 for r in deps[name]["replicas"] if r["state"] == "RUNNING")

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                data = httpx.get(self.url, timeout=5, headers=dashboard_auth_headers()).json()
                deps = data["applications"][self.app]["deployments"]
                t = time.monotonic() - self.t0
                engines, routers = (
                    self._running(deps, ENGINE_DEPLOYMENT),
                    self._running(deps, ROUTER_DEPLOYMENT),
                )
                target = int(deps[ENGINE_DEPLOYMENT]["target_num_replicas"])
                self.samples.append((t, self.in_flight[0], engines, routers, target))
            except (httpx.HTTPError, KeyError, ValueError):
                continue


async def _one(
    client: httpx.AsyncClient,
    model: str,
    rng: random.Random,
    max_tokens: int,
    rec: RequestRecord,
    in_flight: list[int],
    t0: float,
) -> None:
    body = {
        "model": model,
        "prompt": [rng.randrange(1, 1900) for _ in range(32)],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    in_flight[0] += 1
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                return
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and rec.ttft_s is None:
                    rec.ttft_s = time.monotonic() - t0 - rec.start_s
                if line == "data: [DONE]":
                    rec.ok = True
    except httpx.HTTPError:
        return
    finally:
        in_flight[0] -= 1


async def replay(
    url: str,
    model: str,
    trace: tuple[tuple[float, float], ...],
    max_tokens: int,
    seed: int,
    in_flight: list[int],
    t0: float,
) -> list[RequestRecord]:
    # Arrivals and prompts from separate streams, so every variant replays the same arrival times
    # however its requests interleave.
    arrivals, prompts = random.Random(seed), random.Random(seed + 1)
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        phase_start = 0.0
        for seconds, rate in trace:
            t = phase_start
            while True:
                t += arrivals.expovariate(rate)
                if t >= phase_start + seconds:
                    break
                delay = t - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = RequestRecord(start_s=time.monotonic() - t0)
                records.append(rec)
                tasks.append(
                    asyncio.create_task(_one(client, model, prompts, max_tokens, rec, in_flight, t0))
                )
            phase_start += seconds
        await asyncio.gather(*tasks)
    return records


def run_variant(
    base: ClusterConfig,
    variant: str,
    lo: int,
    hi: int,
    trace: tuple[tuple[float, float], ...],
    max_tokens: int,
    seed: int,
    slo_ttft_s: float = 1.0,
) -> VariantResult:
    import ray
    from ray import serve

    dash, port = free_port(), free_port()
    base = base.model_copy(update={"http": base.http.model_copy(update={"port": port})})
    cfg, body = variant_config(base, variant, lo, hi, slo_ttft_s)
    os.environ.update(cfg.serve_runtime.environment(port))  # read by every Ray process at start
    ray.init(
        num_cpus=8,
        resources={"fake_gpu": hi},
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dash,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        put_serve_config(f"http://127.0.0.1:{dash}", body)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 600)
        deadline = time.monotonic() + 300  # fixed-max: every replica up before the clock starts
        while time.monotonic() < deadline:
            deps = httpx.get(
                f"http://127.0.0.1:{dash}/api/serve/applications/",
                timeout=5,
                headers=dashboard_auth_headers(),
            ).json()["applications"][cfg.app_name]["deployments"]
            if deps[ENGINE_DEPLOYMENT]["status"] == "HEALTHY":
                break
            time.sleep(1)
        in_flight, t0 = [0], time.monotonic()
        sampler = _Sampler(f"http://127.0.0.1:{dash}", cfg.app_name, in_flight, t0)
        records = asyncio.run(
            replay(url, cfg.model.served_model_name, trace, max_tokens, seed, in_flight, t0)
        )
        sampler.stop.set()
        sampler.thread.join(timeout=5)
        return VariantResult(
            name=variant,
            records=records,
            samples=sampler.samples,
            trace_s=sum(s for s, _ in trace),
            first_burst_s=next(
                (sum(s for s, _ in trace[:i]) for i, (_, r) in enumerate(trace) if r > trace[0][1]), 0.0
            ),
            min_replicas=lo,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def format_table(results: list[VariantResult], slo_s: float) -> str:
    by = {r.name: r for r in results}
    ref = by.get("fixed-max")
    lines = [
        f"| variant | SLO attainment (TTFT ≤ {slo_s:g} s) | replica-s | vs fixed-max | "
        "scale-up: asked / running | TTFT p50 / p95 | requests | failed (by status) |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        ttfts = [x.ttft_s for x in r.records if x.ttft_s is not None]
        rs = r.replica_seconds()
        ratio = f"{rs / ref.replica_seconds():.2f}×" if ref and ref.replica_seconds() else "—"
        scales = r.name not in ("fixed-min", "fixed-max")
        asked, up = (r.time_to_scale_up(4), r.time_to_scale_up(2)) if scales else (None, None)
        up_text = " / ".join(f"{v:.1f} s" if v is not None else "—" for v in (asked, up))
        lines.append(
            f"| {r.name} | {100 * r.attainment(slo_s):.1f}% | {rs:.0f} | {ratio} | "
            f"{up_text} | {pct(ttfts, 0.5):.2f} / {pct(ttfts, 0.95):.2f} s | "
            f"{len(r.records)} | {r.failures_by_status()} |"
        )
    return "\n".join(lines)


def write_plot(results: list[VariantResult], path: Path, hi: int) -> Path:
    """Load (requests in flight) and engine/router replicas over time, one panel per variant."""
    from PIL import Image, ImageDraw

    w, ph, margin = 900, 170, 40
    img = Image.new("RGB", (w, ph * len(results) + 20), "white")
    draw = ImageDraw.Draw(img)
    t_max = max((s[0] for r in results for s in r.samples), default=1.0) or 1.0
    load_max = max((s[1] for r in results for s in r.samples), default=1) or 1
    for i, r in enumerate(results):
        top = 10 + i * ph
        x0, x1, y0, y1 = margin, w - 10, top + 20, top + ph - 20
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(
            (x0, top + 4),
            f"{r.name}: requests in flight (grey, 0..{load_max}); engines running (blue), asked for "
            f"(orange), routers running (green), 0..{hi}",
            fill="black",
        )

        series = (("#999999", 1, load_max), ("#2a9d3a", 3, hi), ("#e07b00", 4, hi), ("#1f5fbf", 2, hi))
        for col, key, vmax in series:
            pts = [(x0 + (x1 - x0) * s[0] / t_max, y1 - (y1 - y0) * s[key] / vmax) for s in r.samples]
            if len(pts) > 1:
                draw.line(pts, fill=col, width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def results_json(results: list[VariantResult], slo_s: float) -> str:
    return json.dumps(
        [
            {
                "variant": r.name,
                "attainment": r.attainment(slo_s),
                "replica_seconds": r.replica_seconds(),
                "time_to_ask_s": r.time_to_scale_up(4) if r.name.startswith(("serve", "maverick")) else None,
                "time_to_scale_up_s": r.time_to_scale_up(2)
                if r.name.startswith(("serve", "maverick"))
                else None,
                "requests": len(r.records),
                "failed": r.failed(),
            }
            for r in results
        ],
        indent=2,
    )
