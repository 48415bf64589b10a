"""Traces and metrics of a real app: 2 engine replicas, a Redis KV tier, prefill/decode
disaggregation, 2 expert workers and the autoscaler, started by `maverick-serve up` with tracing
sent to an OTLP receiver the test runs on a free port."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from prometheus_server import PrometheusServer, prometheus_binary

from conftest import MODEL_NAME, RunningCluster, launch_cluster
from maverick_serve.kvtier.redis_process import RedisProcess
from ops_queries import OPS, dashboard_queries, read_names, rule_queries

pytestmark = pytest.mark.slow
# Long enough for the prefill path (threshold 200 tokens); words a leak check can look for.
SECRET_WORD = "zebracorn"
LONG_PROMPT = " ".join([SECRET_WORD, "tell", "me", "about", "llamas"] * 60)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def observed(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver
) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("observed")
    redis = RedisProcess(root)
    redis.start()
    config = {
        "model": {"path": str(tiny_model), "served_model_name": MODEL_NAME},
        "engine": {"kv_cache_memory_gib": 0.05, "max_model_len": 4096, "num_threads": 1},
        "kvtier": {"store": {"type": "redis", "url": redis.url}, "block_size": 32},
        "disaggregation": {"enabled": True, "threshold_tokens": 200},
        "experts": {"mode": "disaggregated", "ep_degree": 2, "worker_threads": 1},
        "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
        "autoscaling": {
            "enabled": True,
            "engine": {"min_replicas": 2, "max_replicas": 2},
            "prefill": {"min_replicas": 1, "max_replicas": 1},
            "router": {"min_replicas": 1, "max_replicas": 1},
        },
        "observability": {"tracing": {"enabled": True, "sampling_ratio": 1.0, "engine_steps": True}},
    }
    # The exporter's batch delay is 5 s by default; the test waits less for each trace.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "300"}
    try:
        with launch_cluster(tiny_model, root, config, env) as running:
            yield running
    finally:
        redis.stop()


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def _chat(cluster: RunningCluster, prompt: str, headers: dict[str, str]) -> tuple[dict, httpx.Headers]:
    client = openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="none", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
        extra_headers=headers,
    )
    return raw.parse().model_dump(), raw.headers


def _ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[str]:
    names, seen = [], set()
    while span.parent_span_id in by_id and span.parent_span_id not in seen:
        seen.add(span.parent_span_id)
        span = by_id[span.parent_span_id]
        names.append(span.name)
    return names


def test_one_request_is_one_trace_with_every_hop(observed: RunningCluster, receiver: OtlpReceiver) -> None:
    header, trace_id, client_span = _traceparent()
    body, headers = _chat(observed, LONG_PROMPT, {"traceparent": header, "tracestate": "vendor=abc"})
    expected = {
        f"chat {MODEL_NAME}",
        "router.parse",
        "router.price",
        "router.choose",
        "router.dispatch",
        "prefill.handoff",
        "kvtier.store",
        "kvtier.load",
        "engine.generate",
        "engine.queue",
        "engine.prefill",
        "engine.decode",
    }
    # Two engine.generate: the prefill replica's and the decode replica's.
    receiver.wait_for(trace_id, expected, counts={"engine.generate": 2})
    spans = receiver.wait_complete(trace_id, client_span)
    names = [s.name for s in spans]
    assert expected <= set(names), f"missing {expected - set(names)}; got {sorted(set(names))}"
    by_id = {s.span_id: s for s in spans}
    # The client's span is the parent of the trace's roots: Serve's proxy span, and the router
    # replica's request span (Serve parents it on the incoming traceparent, not on its proxy span).
    roots = [s for s in spans if s.parent_span_id not in by_id]
    assert {r.parent_span_id for r in roots} == {client_span}, [(r.name, r.parent_span_id) for r in roots]
    assert any(r.name.startswith("proxy_http_request") for r in roots)
    # Background work (hub polls) started by a request stays out of its trace.
    assert not any("ReplicaStateHub" in s.name for s in spans), sorted({s.name for s in spans})
    # The response names this trace, so a client can look it up.
    assert headers["traceparent"].split("-")[1] == trace_id
    assert headers["tracestate"] == "vendor=abc"
    # `up` said where the traces go.
    assert f"Traces:         OTLP/HTTP {receiver.endpoint}/v1/traces, 100% of new traces sampled" in (
        observed.log.read_text()
    )
    chat = next(s for s in spans if s.name == f"chat {MODEL_NAME}")
    generates = [s for s in spans if s.name == "engine.generate"]
    chains = [_ancestors(g, by_id) for g in generates]
    # The prefill replica, then the decode replica (a retry would add one more).
    assert any("prefill.handoff" in c for c in chains) and any("router.dispatch" in c for c in chains), chains
    assert all(f"chat {MODEL_NAME}" in c for c in chains), chains
    for stage in ("engine.queue", "engine.prefill", "engine.decode", "kvtier.load"):
        assert all(by_id[s.parent_span_id].name == "engine.generate" for s in spans if s.name == stage)
    usage = body["usage"]
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.request.model"] == MODEL_NAME
    assert chat.attributes["gen_ai.request.max_tokens"] == 8
    assert chat.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert chat.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert chat.attributes["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    assert chat.attributes["http.response.status_code"] == 200
    # The decode replica loaded the prompt's KV that the prefill replica stored.
    # Opt-in detail: each engine step, with the time its MoE layers waited on the expert workers.
    steps = [s for s in spans if s.name == "engine.step"]
    assert steps and all(by_id[s.parent_span_id].name == "engine.generate" for s in steps)
    assert max(s.attributes["maverick.experts.dispatch_seconds"] for s in steps) > 0
    loads = [s for s in spans if s.name == "kvtier.load"]  # prefill replica: a miss; decode: the hit
    assert max(s.attributes["maverick.kvtier.hit_tokens"] for s in loads) > 0
    # Prompts stay out of traces unless observability.tracing.record_content is on.
    for s in spans:
        for value in s.attributes.values():
            assert SECRET_WORD not in str(value), (s.name, value)


def test_a_sampled_out_request_records_nothing(observed: RunningCluster, receiver: OtlpReceiver) -> None:
    off, off_trace, _ = _traceparent(sampled=False)
    _chat(observed, "short and unsampled", {"traceparent": off})
    on, on_trace, _ = _traceparent()
    _chat(observed, "short and sampled", {"traceparent": on})
    # Spans of the later, sampled request arriving means the earlier one's would have too.
    assert receiver.wait_for(on_trace, {f"chat {MODEL_NAME}", "engine.decode"})
    time.sleep(1.0)
    assert receiver.trace(off_trace) == []


@pytest.mark.parametrize("bad", ["garbage", "00-xyz-abc-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"])
def test_a_malformed_traceparent_starts_a_new_trace(observed: RunningCluster, bad: str) -> None:
    body, headers = _chat(observed, "hello", {"traceparent": bad, "tracestate": "vendor=abc"})
    assert body["choices"][0]["message"]["content"] is not None
    _version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    assert "tracestate" not in headers
    assert len(trace_id) == 32 and trace_id != "0" * 32 and len(span_id) == 16


def _scraped_names(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_every_metric_that_dashboards_and_alerts_read_is_in_a_live_scrape(observed: RunningCluster) -> None:
    """The scrape, not the catalogue: names after Ray's exporter (ray_ prefix, _total suffix)."""
    _chat(observed, "one more", {})
    wanted = read_names()
    assert len(wanted) > 30
    missing: set[str] = set(wanted)
    deadline = time.monotonic() + 90
    while missing and time.monotonic() < deadline:
        with urllib.request.urlopen(observed.metrics_url, timeout=5) as resp:
            missing = set(wanted) - _scraped_names(resp.read().decode())
        if missing:
            time.sleep(3)
    assert not missing, {name: wanted[name] for name in sorted(missing)}


def test_status_watch_shows_the_running_cluster(observed: RunningCluster) -> None:
    _chat(observed, "status please", {})
    cmd = [sys.executable, "-m", "maverick_serve.cli", "status", "--watch", "--once", "--interval", "3"]
    r = subprocess.run([*cmd, "--metrics", observed.metrics_url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "LlamaEngine" in out and "LlamaPrefill" in out
    assert "autoscaler targets:" in out and "engine 2" in out
    rows = [line for line in out.splitlines() if line[:1].isalnum() and line.split()[-1].endswith("x")]
    assert len(rows) >= 2, out  # the engine replicas (and the prefill one once it reported), with imbalance
    assert "TTFT p50" in out and "KV-tier hit ratio" in out


def test_a_real_prometheus_evaluates_every_rule_and_dashboard_query(
    observed: RunningCluster, tmp_path: Path
) -> None:
    """Prometheus scrapes the app, evaluates ops/prometheus's rules without errors, and every
    dashboard query runs; the core panels have data."""
    binary = prometheus_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing in CI: scripts/setup.sh runs scripts/setup-prometheus.sh")
        pytest.skip("prometheus is not installed (bash scripts/setup-prometheus.sh)")
    target = observed.metrics_url.removeprefix("http://").removesuffix("/metrics")
    prom = PrometheusServer(binary, tmp_path, target, sorted((OPS / "prometheus").glob("*.rules.yaml")))
    try:
        started = time.monotonic()
        while True:  # traffic during the scrapes, so rates have samples to work on
            _chat(observed, LONG_PROMPT if len(prom.query("up")) % 2 else "short one", {})
            elapsed = time.monotonic() - started
            if (elapsed > 20 and prom.query("vllm:time_to_first_token_seconds_count")) or elapsed > 90:
                break
        targets = prom.api("targets")["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == len(rule_queries())
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], [r.get("lastError") for r in rules]
        empty = []
        for q in dashboard_queries():
            expr = q.expr.replace('=~"$model"', '=~".*"').replace('=~"$replica"', '=~".*"')
            expr = expr.replace('=~"$deployment"', '=~".*"')
            if not prom.query(expr):
                empty.append(q.where)
        # With traffic and no failures, only error- and drop-shaped panels may be empty.
        core = [
            w
            for w in empty
            if any(
                k in w
                for k in (
                    "TTFT",
                    "KV cache usage",
                    "Tokens per second",
                    "Requests running",
                    "Desired replicas",
                )
            )
        ]
        assert core == [], empty
        assert prom.query("vllm:num_requests_running"), "the vLLM-compatible series are recorded"
        firing = [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
        assert "MaverickEngineMetricsAbsent" not in firing
    finally:
        prom.stop()
