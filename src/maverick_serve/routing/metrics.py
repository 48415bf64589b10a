"""Router metrics: decisions by policy and reason, predicted vs actual cache hits, queues,
rejections and retries. Exported through `ray.util.metrics` when Ray runs, and always kept as
plain counters (`RouterStats`) for tests and `bench router`."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)
PREFIX = "maverick_router_"


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


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.stats = RouterStats()
        self.ray: dict[str, Any] = {}
        try:
            from ray.util import metrics

            self.ray = {
                "decisions": metrics.Counter(
                    PREFIX + "decisions_total", "Routing decisions.", tag_keys=("policy", "reason")
                ),
                "rejections": metrics.Counter(
                    PREFIX + "rejections_total", "Requests refused (401, 429, 504).", tag_keys=("reason",)
                ),
                "retries": metrics.Counter(
                    PREFIX + "retries_total", "Requests retried on another replica before the first token."
                ),
                "predicted": metrics.Counter(
                    PREFIX + "predicted_hit_tokens_total", "Prompt tokens the policy expected to be cached."
                ),
                "actual": metrics.Counter(
                    PREFIX + "actual_hit_tokens_total", "Prompt tokens the engine found cached."
                ),
                "prompt": metrics.Counter(PREFIX + "prompt_tokens_total", "Prompt tokens routed."),
                "queue": metrics.Gauge(
                    PREFIX + "replica_queue",
                    "Waiting requests per engine replica, as this router sees them.",
                    tag_keys=("replica",),
                ),
            }
        except Exception:  # no Ray (plain Python): keep the in-process counters only
            logger.debug("ray metrics unavailable for the router")

    def decision(self, reason: str, replica: str, predicted: int, prompt: int, image_tokens: int) -> None:
        s = self.stats
        s.decisions[(self.policy, reason)] += 1
        s.predicted_hit_tokens += predicted
        s.prompt_tokens += prompt
        s.sent[replica] += 1
        s.image_tokens[replica] += image_tokens
        if self.ray:
            self.ray["decisions"].inc(1, {"policy": self.policy, "reason": reason})
            if predicted:
                self.ray["predicted"].inc(predicted)
            if prompt:
                self.ray["prompt"].inc(prompt)

    def actual_hit(self, tokens: int) -> None:
        self.stats.actual_hit_tokens += tokens
        if self.ray and tokens:
            self.ray["actual"].inc(tokens)

    def rejection(self, reason: str) -> None:
        self.stats.rejections[reason] += 1
        if self.ray:
            self.ray["rejections"].inc(1, {"reason": reason})

    def retry(self) -> None:
        self.stats.retries += 1
        if self.ray:
            self.ray["retries"].inc(1)

    def queues(self, queued: dict[str, int]) -> None:
        if self.ray:
            for replica, n in queued.items():
                self.ray["queue"].set(n, {"replica": replica})
