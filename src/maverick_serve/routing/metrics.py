"""Router metrics: decisions by policy and reason, predicted vs actual cache hits, queues,
rejections, retries, answers and latencies. Exported through `ray.util.metrics` when Ray runs
(names in `observability.catalogue`), and always kept as plain counters (`RouterStats`) for tests
and `bench router`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from maverick_serve.observability.catalogue import ROUTER_METRICS
from maverick_serve.observability.ray_metrics import MetricSet

P = "maverick_router_"


@dataclass
class RouterStats:
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (policy, reason)
    rejections: Counter[str] = field(default_factory=Counter)  # reason
    retries: int = 0
    predicted_hit_tokens: int = 0
    actual_hit_tokens: int = 0
    prompt_tokens: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # replica → requests
    image_tokens: Counter[str] = field(default_factory=Counter)  # replica → image tokens
    answered: Counter[int] = field(default_factory=Counter)  # HTTP status → responses
    prefill_handoffs: Counter[str] = field(default_factory=Counter)  # outcome → requests


class RouterMetrics:
    """Router counters, kept in `stats` and exported from the catalogue's specs."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.stats = RouterStats()
        self.m = MetricSet(ROUTER_METRICS)

    def decision(self, reason: str, replica: str, predicted: int, prompt: int, image_tokens: int) -> None:
        s = self.stats
        s.decisions[(self.policy, reason)] += 1
        s.predicted_hit_tokens += predicted
        s.prompt_tokens += prompt
        s.sent[replica] += 1
        s.image_tokens[replica] += image_tokens
        self.m.inc(P + "decisions", 1, {"policy": self.policy, "reason": reason})
        self.m.inc(P + "predicted_hit_tokens", predicted)
        self.m.inc(P + "prompt_tokens", prompt)

    def actual_hit(self, tokens: int) -> None:
        self.stats.actual_hit_tokens += tokens
        self.m.inc(P + "actual_hit_tokens", tokens)

    def rejection(self, reason: str) -> None:
        self.stats.rejections[reason] += 1
        self.m.inc(P + "rejections", 1, {"reason": reason})

    def retry(self) -> None:
        self.stats.retries += 1
        self.m.inc(P + "retries", 1)

    def queues(self, queued: dict[str, int]) -> None:
        for replica, n in queued.items():
            self.m.set(P + "replica_queue", n, {"replica": replica})

    def answered(self, route: str, status: int, seconds: float) -> None:
        """A response complete (the last byte of a stream); `route` is a fixed route name."""
        self.stats.answered[status] += 1
        self.m.inc(P + "requests", 1, {"route": route, "code": str(status)})
        self.m.observe(P + "request_duration_seconds", seconds, {"route": route})

    def first_token(self, route: str, seconds: float) -> None:
        self.m.observe(P + "time_to_first_token_seconds", seconds, {"route": route})

    def prefill_handoff(self, outcome: str, seconds: float | None = None) -> None:
        self.stats.prefill_handoffs[outcome] += 1
        self.m.inc(P + "prefill_handoffs", 1, {"outcome": outcome})
        if seconds is not None:
            self.m.observe(P + "prefill_handoff_seconds", seconds)
