"""The engine tier's latency p95s from Prometheus (optional, on clusters).

The replicas' pushes carry each replica's own p95 over its window, and the policy takes the
highest; Prometheus has every replica's histogram, so it can give the tier's p95 over all of
its requests (`histogram_quantile` of the summed bucket rates), and it keeps counting across
replica restarts. Load is not taken from it: a scrape is 15-30 s old where a push is 2 s old.

Runs in Serve's controller, inside the autoscaling policy. Serve's `PrometheusQueryMixin` does
the fetching on a daemon thread of its own, so a policy tick never waits on the network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ray.serve.autoscaling_policy import PrometheusQueryMixin

from maverick_serve.autoscaling.signals import TierSignals
from maverick_serve.config.autoscaling import PrometheusSignalsConfig
from maverick_serve.observability.catalogue import ENGINE_METRICS

_LATENCY_METRICS = {
    "ttft_p95_s": "maverick_engine_time_to_first_token_seconds",
    "itl_p95_s": "maverick_engine_inter_token_latency_seconds",
}


def latency_queries(cfg: PrometheusSignalsConfig) -> dict[str, str]:
    """TierSignals field -> PromQL: the tier's p95 over `window_s`, every replica's buckets summed."""
    exported = {spec.name: spec.exported_name for spec in ENGINE_METRICS}
    window = f"{math.ceil(cfg.window_s)}s"
    return {
        field: f"histogram_quantile(0.95, sum by (le) "
        f"(rate({exported[metric]}_bucket{{{cfg.selector}}}[{window}])))"
        for field, metric in _LATENCY_METRICS.items()
    }


class _Fetcher(PrometheusQueryMixin):
    """Serve's mixin on its own: the queries' latest results, refreshed in the background."""


class PrometheusLatencies:
    """Contract: `latest()` never blocks; it returns each p95 in seconds, or None where Prometheus
    is unset or unreachable, its result is older than `max_age_s`, or the window saw no request
    (the quantile of no rate is NaN). The first call starts the background fetch."""

    def __init__(self, cfg: PrometheusSignalsConfig) -> None:
        self.queries = latency_queries(cfg)
        self._fetcher = _Fetcher(
            prometheus_address=cfg.address,  # None: RAY_PROMETHEUS_HOST, as Ray's dashboard reads it
            prometheus_queries=list(self.queries.values()),
            fetch_interval_s=cfg.fetch_interval_s,
            cache_ttl_s=cfg.max_age_s,
        )

    def latest(self) -> dict[str, float | None]:
        metrics = self._fetcher.prometheus_metrics or {}
        return {field: _finite(metrics.get(query)) for field, query in self.queries.items()}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def with_latencies(signals: TierSignals, latest: dict[str, float | None]) -> TierSignals:
    """The signals with Prometheus' p95s where it has them; the pushed ones elsewhere."""
    ttft, itl = latest.get("ttft_p95_s"), latest.get("itl_p95_s")
    return dataclasses.replace(
        signals,
        ttft_p95_s=signals.ttft_p95_s if ttft is None else ttft,
        itl_p95_s=signals.itl_p95_s if itl is None else itl,
    )
