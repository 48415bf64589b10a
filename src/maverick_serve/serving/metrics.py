"""Engine replica metrics through `ray.util.metrics`, so they show on the Ray dashboard and its
Prometheus endpoint. Names, types, labels and buckets come from the catalogue
(`observability.catalogue`); this module only maps engine stats and request timings onto them."""

from __future__ import annotations

from collections import defaultdict

from maverick_serve.engine.types import EngineStats, RequestTiming
from maverick_serve.observability.catalogue import ENGINE_METRICS, KVTIER_METRICS
from maverick_serve.observability.ray_metrics import CumulativeCounters, MetricSet

E = "maverick_engine_"


class EngineMetrics:
    def __init__(self, replica: str, model: str) -> None:
        self.m = MetricSet(ENGINE_METRICS + KVTIER_METRICS, {"replica": replica, "model_name": model})
        self.totals = CumulativeCounters()

    @property
    def enabled(self) -> bool:
        return self.m.enabled

    def record(self, stats: EngineStats) -> None:
        """A periodic snapshot: gauges set, cumulative totals turned into counter increments."""
        m, d = self.m, self.totals.delta
        m.set(E + "num_requests_running", stats.running)
        m.set(E + "num_requests_waiting", stats.waiting)
        m.set(E + "kv_cache_usage_perc", stats.kv_usage)
        for group, used in stats.kv_blocks_used.items():
            m.set(E + "kv_blocks_used", used, {"group": group})
        for group, free in stats.kv_blocks_free.items():
            m.set(E + "kv_blocks_free", free, {"group": group})
        m.set(E + "prefill_tokens_per_second", stats.prefill_tokens_per_s)
        m.set(E + "decode_tokens_per_second", stats.decode_tokens_per_s)
        m.inc(E + "prompt_tokens", d("prompt", stats.prompt_tokens_total))
        # Every admitted prompt token is looked up in the prefix cache (vLLM counts the same way).
        m.inc(E + "prefix_cache_queries", d("queries", stats.prompt_tokens_total))
        m.inc(E + "prefix_cache_hits", d("hits", stats.prefix_cache_hit_tokens))
        m.inc(E + "generation_tokens", d("generated", stats.generated_tokens_total))
        m.inc(E + "num_preemptions", d("preemptions", stats.preemptions_total))
        for key, value in stats.kvtier.items():
            if "maverick_kvtier_" + key in m.specs:
                m.inc("maverick_kvtier_" + key, d("kvtier_" + key, value))
        if stats.expert_imbalance is not None:
            m.set(E + "expert_imbalance_ratio", stats.expert_imbalance)
        per_expert: dict[int, float] = defaultdict(float)
        for counts in stats.expert_tokens.values():  # summed over layers: 128 series, not 128 × layers
            for expert, count in enumerate(counts):
                per_expert[expert] += count
        for expert, count in per_expert.items():
            m.set(E + "expert_tokens", count, {"expert": str(expert)})

    def request_finished(self, timing: RequestTiming, finish_reason: str | None) -> None:
        """One request's latency histograms, from the engine's own stamps."""
        m = self.m
        m.inc(E + "request_success", 1, {"finished_reason": finish_reason or "abort"})
        if timing.first_token is not None:
            m.observe(E + "time_to_first_token_seconds", timing.first_token - timing.arrival)
        if timing.finished is not None:
            m.observe(E + "e2e_request_latency_seconds", timing.finished - timing.arrival)
        if timing.first_scheduled is not None:
            m.observe(E + "request_queue_time_seconds", timing.first_scheduled - timing.arrival)
            if timing.first_token is not None:
                m.observe(E + "request_prefill_time_seconds", timing.first_token - timing.first_scheduled)
        if timing.first_token is not None and timing.finished is not None:
            m.observe(E + "request_decode_time_seconds", timing.finished - timing.first_token)

    def token_gap(self, seconds: float, tokens: int) -> None:
        for _ in range(max(1, tokens)):
            self.m.observe(E + "inter_token_latency_seconds", seconds)
