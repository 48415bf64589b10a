"""The metric catalogue, tracing configuration, counters from totals, and `status --watch`'s view."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.observability import TracingConfig, sampling_ratio_from_env
from maverick_serve.net import free_port
from maverick_serve.observability.catalogue import CATALOGUE, TTFT_BUCKETS, exported_series, spec
from maverick_serve.observability.live_status import Scrape, quantile, render
from maverick_serve.observability.ray_metrics import CumulativeCounters, MetricSet


def test_catalogue_names_are_unique_ascii_and_bounded() -> None:
    names = [s.name for s in CATALOGUE]
    assert len(names) == len(set(names))
    for s in CATALOGUE:
        assert s.description.isascii(), s.name  # Ray refuses non-ASCII descriptions
        assert s.name.startswith("maverick_") and not s.name.endswith("_total"), s.name
        assert not {"request_id", "user", "prompt", "session"} & set(s.labels), s.name
        assert (s.kind == "histogram") == bool(s.buckets), s.name
    assert spec("maverick_engine_time_to_first_token_seconds").buckets == TTFT_BUCKETS
    series = exported_series()
    assert "ray_maverick_engine_prompt_tokens_total" in series
    assert "ray_maverick_engine_inter_token_latency_seconds_bucket" in series
    assert "ray_maverick_engine_kv_cache_usage_perc" in series


def test_metric_set_outside_ray_is_a_no_op_but_checks_nothing_silently() -> None:
    m = MetricSet(CATALOGUE)
    assert not m.enabled
    m.inc("maverick_router_retries")  # no Ray: nothing to export, nothing raised


def test_cumulative_totals_become_increments_and_survive_restarts() -> None:
    c = CumulativeCounters()
    assert c.delta("x", 10) == 10
    assert c.delta("x", 15) == 5
    assert c.delta("x", 15) == 0
    assert c.delta("x", 3) == 3  # the engine restarted: its total starts again
    assert c.delta("x", 4, {"group": "a"}) == 4  # labels are separate series


def test_tracing_is_off_by_default_and_on_with_the_standard_endpoint_variable() -> None:
    off = TracingConfig().resolve({})
    assert not off.enabled and off.environment() == {}
    on = TracingConfig().resolve({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    env = on.environment()
    assert (
        env["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"]
        == "maverick_serve.observability.tracing:span_processors"
    )
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert env["RAY_SERVE_TRACING_SAMPLING_RATIO"] == "0.01"  # sampled by default
    assert env["MAVERICK_TRACING_RECORD_CONTENT"] == "0"
    cfg = TracingConfig(enabled=True, endpoint="http://a:4318", sampling_ratio=0.5, record_content=True)
    env = cfg.resolve({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318"}).environment()
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://a:4318"  # config wins
    assert env["RAY_SERVE_TRACING_SAMPLING_RATIO"] == "0.5" and env["MAVERICK_TRACING_RECORD_CONTENT"] == "1"
    assert not TracingConfig(enabled=False).resolve({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b"}).enabled


@pytest.mark.parametrize(
    ("env", "ratio"),
    [
        ({}, 0.01),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 0.25),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, 1.0),
        ({"OTEL_TRACES_SAMPLER_ARG": "0.2"}, 0.2),
    ],
)
def test_standard_sampler_variables(env: dict[str, str], ratio: float) -> None:
    assert sampling_ratio_from_env(env) == ratio


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER='jaeger_remote' is not supported"),
        ({"OTEL_TRACES_SAMPLER_ARG": "lots"}, "OTEL_TRACES_SAMPLER_ARG='lots' is not a number"),
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "outside [0, 1]"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "only http/protobuf is installed"),
    ],
)
def test_bad_tracing_variables_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TracingConfig(enabled=True).resolve(env)


def test_bad_tracing_config_names_the_field() -> None:
    with pytest.raises(ValidationError, match=r"observability\.tracing\.sampling_ratio"):
        ClusterConfig.model_validate({"observability": {"tracing": {"sampling_ratio": 2}}})
    with pytest.raises(ValidationError, match="endpoint must be an http"):
        ClusterConfig.model_validate({"observability": {"tracing": {"endpoint": "collector:4317"}}})


def test_quantile_matches_prometheus_interpolation() -> None:
    buckets = {0.1: 1.0, 0.25: 10.0, float("inf"): 10.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.15 * 4 / 9)  # promtool agrees (ops tests)
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == 0.1  # in +Inf: the highest finite bound


def _exposition(tokens: float, ttft_fast: float, ttft_all: float, waiting: float) -> str:
    w = 'replica="r1",model_name="m",WorkerId="abc"'
    return f"""# TYPE ray_maverick_engine_num_requests_waiting gauge
ray_maverick_engine_num_requests_waiting{{{w}}} {waiting}
# TYPE ray_maverick_engine_num_requests_running gauge
ray_maverick_engine_num_requests_running{{{w}}} 2
# TYPE ray_maverick_engine_kv_cache_usage_perc gauge
ray_maverick_engine_kv_cache_usage_perc{{{w}}} 0.5
# TYPE ray_maverick_engine_generation_tokens counter
ray_maverick_engine_generation_tokens_total{{{w}}} {tokens}
# TYPE ray_maverick_engine_time_to_first_token_seconds histogram
ray_maverick_engine_time_to_first_token_seconds_bucket{{{w},le="0.1"}} {ttft_fast}
ray_maverick_engine_time_to_first_token_seconds_bucket{{{w},le="+Inf"}} {ttft_all}
ray_maverick_engine_time_to_first_token_seconds_count{{{w}}} {ttft_all}
ray_maverick_engine_time_to_first_token_seconds_sum{{{w}}} 1.0
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{{deployment="LlamaEngine",replica="r1"}} 1
# TYPE ray_maverick_autoscaler_desired_replicas gauge
ray_maverick_autoscaler_desired_replicas{{tier="engine"}} 3
"""


def test_status_view_reads_rates_and_windowed_quantiles() -> None:
    old = Scrape.parse(_exposition(tokens=100, ttft_fast=10, ttft_all=10, waiting=0), at=0.0)
    new = Scrape.parse(_exposition(tokens=300, ttft_fast=10, ttft_all=20, waiting=4), at=10.0)
    text = "\n".join(render(new, old))
    assert "generated 20.0 tok/s" in text  # (300 - 100) / 10 s
    # In the window all 10 new requests were slower than 0.1 s: p50 is the highest finite bound,
    # where the lifetime histogram would say p50 = 0.1 s too but from the fast early requests.
    assert "TTFT p50 100 ms" in text
    assert "LlamaEngine" in text and "autoscaler targets: engine 3" in text
    row = next(line for line in text.splitlines() if line.startswith("r1"))
    assert row.split()[1:4] == ["2", "4", "50%"]


def test_status_watch_without_a_cluster_says_where_it_looked() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    cmd = [sys.executable, "-m", "maverick_serve.cli", "status", "--watch", "--once", "--metrics", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"no metrics at {url}" in r.stdout
    r = subprocess.run([*cmd, "--interval", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--interval must be > 0" in r.stderr


def test_an_unreachable_collector_costs_dropped_spans_not_request_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad input: OTLP endpoint down. Ending a span stays microseconds (export is on the batch
    thread), the bounded queue drops the overflow, and both kinds of loss are counted."""
    from opentelemetry.sdk.trace import TracerProvider

    from maverick_serve.observability.tracing import span_processors

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.setenv("MAVERICK_TRACING_EXPORT_TIMEOUT_S", "0.5")
    (processor,) = span_processors()
    provider = TracerProvider()  # its own provider: the process-wide one stays untouched
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    started = time.perf_counter()
    for i in range(2000):
        with tracer.start_as_current_span(f"request {i}"):
            pass
    per_span_ms = (time.perf_counter() - started) / 2000 * 1000
    assert per_span_ms < 1.0, per_span_ms  # never waits for the network
    processor.force_flush(timeout_millis=5000)
    exporter = processor.span_exporter
    assert processor.queue_full_drops > 1000  # 2000 spans into a queue of 64
    assert exporter.failed > 0 and exporter.exported == 0
    provider.shutdown()


def test_readme_metric_table_is_the_catalogue() -> None:
    from pathlib import Path

    from maverick_serve.observability.catalogue import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "README's metric table is stale: paste markdown_table()'s output"
