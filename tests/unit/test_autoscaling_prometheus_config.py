"""Optional Prometheus latencies for the engine tier: config, queries, precedence, wiring."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from maverick_serve.autoscaling.prometheus_signals import (
    PrometheusLatencies,
    latency_queries,
    with_latencies,
)
from maverick_serve.autoscaling.signals import TierSignals
from maverick_serve.config.autoscaling import PrometheusSignalsConfig
from maverick_serve.config.cluster import ClusterConfig


def test_queries_take_the_tiers_p95_over_every_replicas_buckets_with_the_selector() -> None:
    cfg = PrometheusSignalsConfig(enabled=True, selector='ray_io_cluster="maverick"', window_s=45.5)
    assert latency_queries(cfg) == {
        "ttft_p95_s": "histogram_quantile(0.95, sum by (le) (rate("
        'ray_maverick_engine_time_to_first_token_seconds_bucket{ray_io_cluster="maverick"}[46s])))',
        "itl_p95_s": "histogram_quantile(0.95, sum by (le) (rate("
        'ray_maverick_engine_inter_token_latency_seconds_bucket{ray_io_cluster="maverick"}[46s])))',
    }
    assert "_bucket{}[60s]" in latency_queries(PrometheusSignalsConfig())["ttft_p95_s"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"selector": "cluster"}, "autoscaling.prometheus.selector 'cluster' is not a list"),
        ({"selector": 'a="x"} or vector(1)'}, "is not a list of PromQL label matchers"),
        ({"address": "prometheus:9090"}, "String should match pattern"),
        ({"max_age_s": 2, "fetch_interval_s": 5}, "max_age_s (2.0) is shorter than fetch_interval_s"),
        ({"window_s": 5}, "greater than or equal to 10"),
    ],
)
def test_bad_prometheus_settings_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        ClusterConfig.model_validate({"autoscaling": {"enabled": True, "prometheus": fields}})
    assert message in str(err.value)
    assert "autoscaling.prometheus" in str(err.value)  # the error's location or its text names it


def test_selectors_prometheus_accepts_pass() -> None:
    ok = 'namespace="llm", ray_io_cluster=~"maverick-.*",pod!="x\\"y",'
    assert PrometheusSignalsConfig(selector=ok).selector == ok


def test_prometheus_p95s_replace_the_pushed_ones_only_where_prometheus_has_them() -> None:
    pushed = TierSignals(now=1.0, replicas=2, load=4.0, ttft_p95_s=0.2, itl_p95_s=0.05)
    both = with_latencies(pushed, {"ttft_p95_s": 2.4, "itl_p95_s": 0.3})
    assert (both.ttft_p95_s, both.itl_p95_s, both.load) == (2.4, 0.3, 4.0)
    one = with_latencies(pushed, {"ttft_p95_s": None, "itl_p95_s": 0.3})
    assert (one.ttft_p95_s, one.itl_p95_s) == (0.2, 0.3)
    assert with_latencies(pushed, {"ttft_p95_s": None, "itl_p95_s": None}) == pushed


def test_without_an_address_nothing_is_fetched_and_the_pushed_p95s_stay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_PROMETHEUS_HOST", raising=False)
    latencies = PrometheusLatencies(PrometheusSignalsConfig(enabled=True))
    assert latencies.latest() == {"ttft_p95_s": None, "itl_p95_s": None}


def test_the_builder_hands_the_prometheus_settings_to_the_engine_tier_only_when_enabled() -> None:
    from maverick_serve.serving.builder import application_autoscaling_policy, tier_autoscaling

    on = ClusterConfig.model_validate(
        {"autoscaling": {"enabled": True, "prometheus": {"enabled": True, "address": "http://prom:9090"}}}
    )
    kwargs = tier_autoscaling(on, "engine")["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs["prometheus"]["address"] == "http://prom:9090"
    router = tier_autoscaling(on, "router")["autoscaling_config"]["policy"]["policy_kwargs"]
    assert "prometheus" not in router
    app = application_autoscaling_policy(on)
    assert app is not None and app["policy_kwargs"]["cluster"]["autoscaling"]["prometheus"]["enabled"]
    off = ClusterConfig.model_validate({"autoscaling": {"enabled": True}})
    assert (
        "prometheus" not in tier_autoscaling(off, "engine")["autoscaling_config"]["policy"]["policy_kwargs"]
    )
