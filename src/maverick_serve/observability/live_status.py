"""`maverick-serve status --watch`: a terminal view of a running cluster from the same metrics the
dashboards read (a Prometheus exposition: Ray's metrics port, or any scrape of it).

Two scrapes `interval` apart give rates and windowed quantiles (counters and histogram buckets
are differenced, as Prometheus' rate() does), so the view shows the last few seconds, not
lifetime averages. Pure functions over the text, so tests feed it exposition strings.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
E = "ray_maverick_engine_"


@dataclass
class Scrape:
    """Samples by name → labels → value (Ray's process labels dropped)."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        noise = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
        out: dict[str, dict[Labels, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith(("ray_maverick_", "ray_serve_deployment_replica_healthy")):
                    continue
                labels = tuple(
                    sorted((k, v) for k, v in s.labels.items() if k not in noise and "otel" not in k)
                )
                out[s.name][labels] = out[s.name].get(labels, 0.0) + s.value
        return cls(at, dict(out))

    def by(self, name: str, label: str) -> dict[str, float]:
        """Values of `name` summed by one label."""
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(name, {}).items():
            out[dict(labels).get(label, "")] += value
        return dict(out)

    def total(self, name: str) -> float:
        return sum(self.samples.get(name, {}).values())


def _delta(new: Scrape, old: Scrape | None, name: str) -> float:
    now = new.total(name)
    if old is None:
        return now
    before = old.total(name)
    return now - before if now >= before else now  # a restart resets counters


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts (upper bound → count), as Prometheus does."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as Prometheus answers
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None


def windowed_buckets(new: Scrape, old: Scrape | None, metric: str) -> dict[float, float]:
    def per_le(s: Scrape | None) -> dict[float, float]:
        out: dict[float, float] = defaultdict(float)
        if s is None:
            return out
        for labels, value in s.samples.get(metric + "_bucket", {}).items():
            out[float(dict(labels)["le"])] += value
        return out

    now, before = per_le(new), per_le(old)
    window = {le: now[le] - before.get(le, 0.0) for le in now}
    if any(v < 0 for v in window.values()):  # a replica restarted: fall back to lifetime counts
        return dict(now)
    return window


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.0%}" if den > 0 else "-"


def _secs(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s")


def render(new: Scrape, old: Scrape | None) -> list[str]:
    span = (new.at - old.at) if old is not None else None
    lines = [f"maverick-serve status  (window {span:.0f} s)" if span else "maverick-serve status  (lifetime)"]
    healthy = new.by("ray_serve_deployment_replica_healthy", "deployment")
    desired = new.by("ray_maverick_autoscaler_desired_replicas", "tier")
    lines.append("")
    lines.append(f"{'deployment':<20}{'healthy':>8}")
    for dep, n in sorted(healthy.items()):
        lines.append(f"{dep:<20}{n:>8.0f}")
    if desired:
        lines.append("autoscaler targets: " + ", ".join(f"{t} {v:.0f}" for t, v in sorted(desired.items())))
    lines.append("")
    running, waiting = (
        new.by(E + "num_requests_running", "replica"),
        new.by(E + "num_requests_waiting", "replica"),
    )
    kv = new.by(E + "kv_cache_usage_perc", "replica")
    imbalance = new.by(E + "expert_imbalance_ratio", "replica")
    lines.append(f"{'engine or prefill replica':<36}{'running':>8}{'waiting':>8}{'KV use':>8}{'experts':>9}")
    for replica in sorted(set(running) | set(waiting) | set(kv)):
        imb = f"{imbalance[replica]:.2f}x" if replica in imbalance else "-"
        lines.append(
            f"{replica[:35]:<36}{running.get(replica, 0):>8.0f}{waiting.get(replica, 0):>8.0f}"
            f"{kv.get(replica, 0):>8.0%}{imb:>9}"
        )
    lines.append("")
    ttft = windowed_buckets(new, old, E + "time_to_first_token_seconds")
    itl = windowed_buckets(new, old, E + "inter_token_latency_seconds")
    hits, queries = (
        _delta(new, old, E + "prefix_cache_hits_total"),
        _delta(new, old, E + "prefix_cache_queries_total"),
    )
    tier_hit = _delta(new, old, "ray_maverick_kvtier_hit_tokens_total")
    tier_miss = _delta(new, old, "ray_maverick_kvtier_miss_tokens_total")
    generated = _delta(new, old, E + "generation_tokens_total")
    answers = new.by("ray_maverick_router_requests_total", "code")
    before = old.by("ray_maverick_router_requests_total", "code") if old else {}
    codes = {c: v - before.get(c, 0.0) for c, v in answers.items() if v - before.get(c, 0.0) > 0}
    lines.append(
        f"TTFT p50 {_secs(quantile(0.5, ttft))}  p95 {_secs(quantile(0.95, ttft))}   "
        f"ITL p50 {_secs(quantile(0.5, itl))}  p95 {_secs(quantile(0.95, itl))}"
    )
    lines.append(
        f"prefix-cache hit ratio {_ratio(hits, queries)}   "
        f"KV-tier hit ratio {_ratio(tier_hit, tier_hit + tier_miss)}"
    )
    if span:
        lines.append(
            f"generated {generated / span:.1f} tok/s   answers: "
            + (", ".join(f"{c} {v / span:.2f}/s" for c, v in sorted(codes.items())) or "none")
        )
    else:
        lines.append(
            f"generated {generated:.0f} tokens   answers: "
            + (", ".join(f"{c} {v:.0f}" for c, v in sorted(codes.items())) or "none")
        )
    return lines


def fetch(url: str, timeout_s: float = 5.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return Scrape.parse(resp.read().decode(), time.monotonic())


def watch(url: str, interval_s: float, once: bool, out: TextIO = sys.stdout) -> int:
    """Redraw every `interval_s` until Ctrl-C; `once`: one frame over one interval, then exit."""
    try:
        old = fetch(url)
    except OSError as exc:
        print(f"no metrics at {url} ({exc}); is `maverick-serve up` running (its --metrics-port)?", file=out)
        return 1
    try:
        while True:
            time.sleep(interval_s)
            try:
                new = fetch(url)
            except OSError as exc:
                print(f"metrics at {url} stopped answering: {exc}", file=out)
                return 1
            frame = "\n".join(render(new, old))
            out.write(frame + "\n" if once else "\x1b[H\x1b[2J" + frame + "\n")
            out.flush()
            if once:
                return 0
            old = new
    except KeyboardInterrupt:
        return 0
