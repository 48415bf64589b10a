"""Every metric maverick-serve exports, in one place: name, type, unit, labels, buckets.

Replicas build their `ray.util.metrics` objects from these specs (`ray_metrics.MetricSet`), the
dashboards and alert rules under ops/ are checked against them and against a live scrape, and the
README's metric table is this list. Ray exports each name with a `ray_` prefix, and counters with a
`_total` suffix (`exported_name`). Labels are bounded: replica ids, tiers, reasons, finish reasons,
groups and experts — never request ids, users or prompts.

Engine latency histograms use vLLM's names and buckets under our prefix; the recording rules in
ops/prometheus/vllm-compat.rules.yaml re-export them (and the gauges and counters vLLM has) as
`vllm:*`, so dashboards and autoscalers written for vLLM read us unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]

# vLLM's buckets (vllm/v1/metrics/loggers.py), so quantiles compare one to one.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ENGINE = ("model_name", "replica")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as passed to ray.util.metrics (no ray_ prefix, no _total)
    kind: MetricKind
    unit: str
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    vllm: str | None = None  # the vLLM series a recording rule re-exports this as
    # Counters only: one label's closed set of values, exported at 0 from the start so rate()
    # and absent() see the series before the first event (Ray shows a series once it has a sample).
    seed: tuple[str, tuple[str, ...]] | None = None

    @property
    def exported_name(self) -> str:
        """The Prometheus name after Ray's exporter (`ray_` prefix, counters `_total`)."""
        return "ray_" + self.name + ("_total" if self.kind == "counter" else "")

    def series(self) -> tuple[str, ...]:
        """Every series name a scrape shows for this metric."""
        base = self.exported_name
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


def _engine(
    name: str,
    kind: MetricKind,
    unit: str,
    description: str,
    extra: tuple[str, ...] = (),
    buckets: tuple[float, ...] = (),
    vllm: str | None = None,
    seed: tuple[str, tuple[str, ...]] | None = None,
) -> MetricSpec:
    return MetricSpec("maverick_engine_" + name, kind, unit, description, ENGINE + extra, buckets, vllm, seed)


ENGINE_METRICS = (
    _engine("num_requests_running", "gauge", "requests", "Requests in the running batch.",
            vllm="vllm:num_requests_running"),
    _engine("num_requests_waiting", "gauge", "requests", "Requests queued for admission.",
            vllm="vllm:num_requests_waiting"),
    _engine("kv_cache_usage_perc", "gauge", "ratio", "KV blocks held by requests / all blocks (0-1).",
            vllm="vllm:kv_cache_usage_perc"),
    _engine("kv_blocks_used", "gauge", "blocks", "KV blocks held by requests, per layer group.",
            extra=("group",)),
    _engine("kv_blocks_free", "gauge", "blocks", "KV blocks free or evictable, per layer group.",
            extra=("group",)),
    _engine("prefill_tokens_per_second", "gauge", "tokens/s", "Prompt tokens computed per second (10 s)."),
    _engine("decode_tokens_per_second", "gauge", "tokens/s", "Tokens generated per second (10 s)."),
    _engine("prompt_tokens", "counter", "tokens", "Prompt tokens admitted.", vllm="vllm:prompt_tokens_total"),
    _engine("generation_tokens", "counter", "tokens", "Tokens generated.",
            vllm="vllm:generation_tokens_total"),
    _engine("prefix_cache_queries", "counter", "tokens", "Prompt tokens looked up in the prefix cache.",
            vllm="vllm:prefix_cache_queries_total"),
    _engine("prefix_cache_hits", "counter", "tokens", "Prompt tokens found in the prefix cache.",
            vllm="vllm:prefix_cache_hits_total"),
    _engine("num_preemptions", "counter", "requests", "Requests preempted for lack of KV blocks.",
            vllm="vllm:num_preemptions_total"),
    _engine("request_success", "counter", "requests", "Requests finished, by finish reason.",
            extra=("finished_reason",), vllm="vllm:request_success_total",
            seed=("finished_reason", ("stop", "length", "abort"))),
    _engine("time_to_first_token_seconds", "histogram", "s", "Arrival at the replica to first token.",
            buckets=TTFT_BUCKETS, vllm="vllm:time_to_first_token_seconds"),
    _engine("inter_token_latency_seconds", "histogram", "s", "Time between streamed tokens.",
            buckets=ITL_BUCKETS, vllm="vllm:inter_token_latency_seconds"),
    _engine("e2e_request_latency_seconds", "histogram", "s", "Arrival at the replica to last token.",
            buckets=REQUEST_LATENCY_BUCKETS, vllm="vllm:e2e_request_latency_seconds"),
    _engine("request_queue_time_seconds", "histogram", "s", "Arrival to first scheduled.",
            buckets=REQUEST_LATENCY_BUCKETS, vllm="vllm:request_queue_time_seconds"),
    _engine("request_prefill_time_seconds", "histogram", "s", "First scheduled to first token.",
            buckets=REQUEST_LATENCY_BUCKETS, vllm="vllm:request_prefill_time_seconds"),
    _engine("request_decode_time_seconds", "histogram", "s", "First token to last token.",
            buckets=REQUEST_LATENCY_BUCKETS, vllm="vllm:request_decode_time_seconds"),
    _engine("expert_imbalance_ratio", "gauge", "ratio",
            "Max/mean expert-worker load over the load window (1 = even; disaggregated experts)."),
    _engine("expert_tokens", "gauge", "tokens",
            "Tokens per routed expert over the load window, summed over MoE layers.", extra=("expert",)),
)  # fmt: skip

# KV tier counters: EngineStats.kvtier keys to (metric, unit, description).
KVTIER_COUNTERS = {
    "hit_tokens": ("tokens", "Prompt tokens loaded from the KV tier."),
    "miss_tokens": ("tokens", "Prompt tokens looked up in the KV tier and not found."),
    "bytes_in": ("bytes", "Bytes loaded from the KV tier."),
    "bytes_out": ("bytes", "Bytes stored into the KV tier."),
    "load_seconds": ("s", "Time spent loading from the KV tier."),
    "store_seconds": ("s", "Time spent storing into the KV tier."),
    "blocks_stored": ("blocks", "KV blocks stored."),
    "dropped_stores": ("blocks", "KV blocks not stored because the store queue was full."),
    "checksum_failures": ("blocks", "KV blocks whose checksum failed on load (recomputed)."),
    "errors": ("operations", "KV tier operations that failed (store unreachable, timeouts)."),
    "breaker_opens": ("events", "Times the tier was marked unhealthy (a call failed or timed out)."),
    "breaker_closes": ("events", "Times a background probe found the tier healthy again."),
    "breaker_skips": ("operations", "Lookups answered as misses without asking an unhealthy tier."),
}
KVTIER_METRICS = tuple(
    MetricSpec("maverick_kvtier_" + key, "counter", unit, desc, ENGINE)
    for key, (unit, desc) in KVTIER_COUNTERS.items()
)

ROUTER_METRICS = (
    MetricSpec("maverick_router_requests", "counter", "requests",
               "Requests answered, by route and HTTP status code.", ("route", "code")),
    MetricSpec("maverick_router_time_to_first_token_seconds", "histogram", "s",
               "Request arrival at the router to first token or first byte of the answer.",
               ("route",), TTFT_BUCKETS),
    MetricSpec("maverick_router_request_duration_seconds", "histogram", "s",
               "Request arrival at the router to response complete.", ("route",), REQUEST_LATENCY_BUCKETS),
    MetricSpec("maverick_router_decisions", "counter", "requests",
               "Routing decisions by policy and the reason that picked the replica.", ("policy", "reason")),
    MetricSpec("maverick_router_rejections", "counter", "requests",
               "Requests refused (401, 429, 504) by reason.", ("reason",),
               seed=("reason", ("overloaded", "deadline"))),
    MetricSpec("maverick_router_retries", "counter", "requests",
               "Requests retried on another replica before the first token."),
    MetricSpec("maverick_router_predicted_hit_tokens", "counter", "tokens",
               "Prompt tokens the policy expected to be cached where it sent them."),
    MetricSpec("maverick_router_actual_hit_tokens", "counter", "tokens",
               "Prompt tokens the engine found cached."),
    MetricSpec("maverick_router_prompt_tokens", "counter", "tokens", "Prompt tokens routed."),
    MetricSpec("maverick_router_replica_queue", "gauge", "requests",
               "Waiting requests per engine replica, as this router sees them.", ("replica",)),
    MetricSpec("maverick_router_prefill_handoffs", "counter", "requests",
               "Long prompts sent to the prefill tier, by outcome (ok; error: refused; fallback: the "
               "prefill replica failed, the engine prefilled; self: no prefill replica up).",
               ("outcome",), seed=("outcome", ("ok", "error", "fallback", "self"))),
    MetricSpec("maverick_router_prefill_handoff_seconds", "histogram", "s",
               "Prefill hand-off: the prefill replica computed and stored the prompt's KV.", (),
               REQUEST_LATENCY_BUCKETS),
)  # fmt: skip

AUTOSCALER_METRICS = (
    MetricSpec("maverick_autoscaler_desired_replicas", "gauge", "replicas",
               "Replicas the tier's policy asks for.", ("tier",)),
    MetricSpec("maverick_autoscaler_load", "gauge", "tier unit",
               "The load the tier's policy saw.", ("tier",)),
    MetricSpec("maverick_autoscaler_target_per_replica", "gauge", "tier unit",
               "Load per replica the policy aims at: configured, or learned.", ("tier",)),
    MetricSpec("maverick_autoscaler_decisions", "counter", "decisions",
               "Autoscaling decisions by reason (up:*, down:*, hold:*, clamp, budget).", ("tier", "reason")),
)  # fmt: skip

TRACING_METRICS = (
    MetricSpec("maverick_tracing_spans_exported", "counter", "spans", "Spans the OTLP exporter delivered."),
    MetricSpec("maverick_tracing_spans_dropped", "counter", "spans",
               "Spans dropped (export queue full, or the endpoint failed), by reason.", ("reason",),
               seed=("reason", ("queue_full", "export_failed"))),
)  # fmt: skip

CATALOGUE: tuple[MetricSpec, ...] = (
    ENGINE_METRICS + KVTIER_METRICS + ROUTER_METRICS + AUTOSCALER_METRICS + TRACING_METRICS
)
BY_NAME = {spec.name: spec for spec in CATALOGUE}


def spec(name: str) -> MetricSpec:
    return BY_NAME[name]


def exported_series() -> dict[str, MetricSpec]:
    """Every Prometheus series name we export to its spec."""
    return {series: s for s in CATALOGUE for series in s.series()}


TABLE_BEGIN = "<!-- metric table: generated from observability/catalogue.py by markdown_table() -->"
TABLE_END = "<!-- end of metric table -->"


def markdown_table() -> str:
    """The README's metric table (a unit test keeps the README equal to it)."""
    rows = [
        TABLE_BEGIN,
        "| Prometheus name | type | unit | labels | vLLM name | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in CATALOGUE:
        labels = ", ".join(s.labels) or "-"
        rows.append(
            f"| `{s.exported_name}` | {s.kind} | {s.unit} | {labels} | "
            f"{'`' + s.vllm + '`' if s.vllm else '-'} | {s.description} |"
        )
    rows.append(TABLE_END)
    return "\n".join(rows)
