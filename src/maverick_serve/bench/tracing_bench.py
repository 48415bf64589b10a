"""`maverick-serve bench tracing`: what request traces cost, measured in one run.

The same streamed load (`bench serve`'s mixed text prompts) against three local clusters, each
started by `maverick-serve up` and running side by side: tracing off, sampled at 1 %, and at
100 %, the last two exporting every sampled span over OTLP/HTTP to a sink in this process (so
export work is real). After a warm-up each, the clusters take turns round by round in a rotating
order; the figures are medians over rounds and the ratios are against "off" from the same run.
Target: ≤ 3 % throughput loss at 100 %.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from maverick_serve.bench.serve_bench import pct, run_level
from maverick_serve.net import free_port
from maverick_serve.serving.up_process import run_up

VARIANTS: tuple[tuple[str, float | None], ...] = (("off", None), ("1%", 0.01), ("100%", 1.0))


class OtlpSink:
    """Accepts OTLP/HTTP exports and counts them; the spans themselves are discarded."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", 0))
                self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class VariantFigures:
    name: str
    tokens_per_s: list[float] = field(default_factory=list)
    ttft_p50_ms: list[float] = field(default_factory=list)
    itl_p50_ms: list[float] = field(default_factory=list)
    errors: int = 0
    exports: int = 0
    export_bytes: int = 0

    @property
    def throughput(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttft_p50_ms)

    @property
    def itl(self) -> float:
        return statistics.median(self.itl_p50_ms)


def _config(model_dir: Path, sampling: float | None, replicas: int) -> dict[str, Any]:
    tracing: dict[str, Any] = {"enabled": sampling is not None}
    if sampling is not None:
        tracing["sampling_ratio"] = sampling
    return {
        "model": {"path": str(model_dir)},
        "engine": {"kv_cache_memory_gib": 0.1, "max_model_len": 4096, "num_threads": 1},
        "resources": {"engine": {"replicas": replicas, "num_cpus": 1}},
        "observability": {"tracing": tracing},
    }


def run(
    model_dir: Path,
    concurrency: int,
    requests: int,
    rounds: int,
    max_tokens: int,
    replicas: int = 1,
    progress: Any = print,
) -> list[VariantFigures]:
    """All three clusters run side by side and take turns, round by round, in a rotating order,
    so the machine's drift (other load, thermal, caches) falls on every variant alike."""
    results = [VariantFigures(name) for name, _ in VARIANTS]
    sinks = [OtlpSink() for _ in VARIANTS]
    try:
        with contextlib.ExitStack() as stack:
            urls = []
            for (name, sampling), sink in zip(VARIANTS, sinks, strict=True):
                progress(f"starting the cluster with tracing {name} ...")
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tracing-")))
                env = (
                    {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}"}
                    if sampling is not None
                    else {}
                )
                up = stack.enter_context(run_up(_config(model_dir, sampling, replicas), tmp, env))
                urls.append(up.api_url)
            with urllib.request.urlopen(f"{urls[0]}/v1/models", timeout=10) as resp:
                model = json.loads(resp.read())["data"][0]["id"]
            for url in urls:  # warm-up: first-request compilation and caches, not measured
                asyncio.run(
                    run_level(url, model, concurrency, max(4, requests // 4), 0.0, max_tokens, seed=99)
                )
            for r in range(rounds):
                order = [(r + k) % len(VARIANTS) for k in range(len(VARIANTS))]
                progress(f"round {r + 1}/{rounds}: " + ", ".join(VARIANTS[k][0] for k in order))
                for k in order:
                    level = asyncio.run(
                        run_level(urls[k], model, concurrency, requests, 0.0, max_tokens, seed=r)
                    )
                    f = results[k]
                    f.tokens_per_s.append(level.output_tokens / level.wall_s if level.wall_s else 0.0)
                    f.ttft_p50_ms.append(pct(level.ttft_ms, 0.5))
                    f.itl_p50_ms.append(pct(level.itl_ms, 0.5))
                    f.errors += level.errors
            time.sleep(2)  # the batch processors' last export
    finally:
        for f, sink in zip(results, sinks, strict=True):
            f.exports, f.export_bytes = sink.requests, sink.bytes
            sink.close()
    return results


def format_table(results: list[VariantFigures], target_loss: float = 0.03) -> str:
    base = results[0]
    lines = [
        f"{'tracing':<8}{'out tok/s':>10}{'vs off':>8}{'TTFT p50':>10}{'vs off':>8}{'ITL p50':>9}"
        f"{'errors':>8}{'OTLP posts':>12}{'KiB':>8}   (medians over rounds)"
    ]
    for f in results:
        lines.append(
            f"{f.name:<8}{f.throughput:>10.1f}{f.throughput / base.throughput:>8.3f}{f.ttft:>8.1f}ms"
            f"{f.ttft / base.ttft:>8.3f}{f.itl:>7.1f}ms{f.errors:>8}{f.exports:>12}"
            f"{f.export_bytes / 1024:>8.0f}"
        )
    full = results[-1]
    loss = 1 - full.throughput / base.throughput
    verdict = "met" if loss <= target_loss else "MISSED"
    lines.append(f"throughput loss at 100 % sampling: {loss:.1%} (target ≤ {target_loss:.0%}): {verdict}")
    return "\n".join(lines)
