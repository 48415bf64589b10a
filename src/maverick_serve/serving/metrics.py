"""Engine replica metrics through `ray.util.metrics`, so they show on the Ray dashboard and its
Prometheus endpoint. Names live here, in one place, for the Grafana dashboards to rely on."""

from __future__ import annotations

from ray.util import metrics

from maverick_serve.engine.types import EngineStats

PREFIX = "maverick_engine_"


class EngineMetrics:
    def __init__(self, replica: str, model: str) -> None:
        self._tags = {"replica": replica, "model": model}
        keys = ("replica", "model")
        self.running = metrics.Gauge(
            PREFIX + "requests_running", "Requests in the running batch.", tag_keys=keys
        )
        self.waiting = metrics.Gauge(
            PREFIX + "requests_waiting", "Requests queued for admission.", tag_keys=keys
        )
        self.kv_used = metrics.Gauge(
            PREFIX + "kv_blocks_used", "KV blocks held by requests.", tag_keys=(*keys, "group")
        )
        self.kv_free = metrics.Gauge(
            PREFIX + "kv_blocks_free", "KV blocks free or evictable.", tag_keys=(*keys, "group")
        )
        self.prefill_tps = metrics.Gauge(
            PREFIX + "prefill_tokens_per_second", "Prompt tokens/s (10 s window).", tag_keys=keys
        )
        self.decode_tps = metrics.Gauge(
            PREFIX + "decode_tokens_per_second", "Generated tokens/s (10 s window).", tag_keys=keys
        )
        self.prefix_hits = metrics.Gauge(
            PREFIX + "prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache (total).",
            tag_keys=keys,
        )
        self.generated = metrics.Gauge(
            PREFIX + "generated_tokens", "Tokens generated (total).", tag_keys=keys
        )
        self.expert_imbalance = metrics.Gauge(
            PREFIX + "expert_imbalance_ratio",
            "Max/mean expert-worker load over the load window (1 = even).",
            tag_keys=keys,
        )
        self.expert_tokens = metrics.Gauge(
            PREFIX + "expert_tokens",
            "Tokens per routed expert over the load window.",
            tag_keys=(*keys, "layer", "expert"),
        )
        self.kvtier = metrics.Gauge(
            PREFIX + "kvtier",
            "KV tier counters (totals) by `counter`: hit_tokens, "
            "miss_tokens, bytes_in, bytes_out, load_seconds, store_seconds, blocks_stored, "
            "dropped_stores, checksum_failures, errors.",
            tag_keys=(*keys, "counter"),
        )
        self.preemptions = metrics.Gauge(
            PREFIX + "preemptions", "Preemptions for lack of KV blocks (total).", tag_keys=keys
        )

    def record(self, stats: EngineStats) -> None:
        t = self._tags
        self.running.set(stats.running, t)
        self.waiting.set(stats.waiting, t)
        for group, used in stats.kv_blocks_used.items():
            self.kv_used.set(used, {**t, "group": group})
        for group, free in stats.kv_blocks_free.items():
            self.kv_free.set(free, {**t, "group": group})
        self.prefill_tps.set(stats.prefill_tokens_per_s, t)
        self.decode_tps.set(stats.decode_tokens_per_s, t)
        self.prefix_hits.set(stats.prefix_cache_hit_tokens, t)
        self.generated.set(stats.generated_tokens_total, t)
        self.preemptions.set(stats.preemptions_total, t)
        for counter, value in stats.kvtier.items():
            self.kvtier.set(value, {**t, "counter": counter})
        if stats.expert_imbalance is not None:
            self.expert_imbalance.set(stats.expert_imbalance, t)
        for layer, counts in stats.expert_tokens.items():
            for expert, count in enumerate(counts):
                self.expert_tokens.set(count, {**t, "layer": str(layer), "expert": str(expert)})
