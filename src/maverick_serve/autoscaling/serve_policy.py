"""Our policies as Ray Serve custom autoscaling policies (`AutoscalingConfig.policy`).

Serve's controller builds `TierAutoscaler(**policy_kwargs)` once per deployment and calls it every
control-loop tick with an `AutoscalingContext`; replicas feed it through `record_autoscaling_stats`
(`EngineServer`: running, waiting, KV usage). The builder sets Serve's own delays to 0 so that
the policy's cooldowns are the only hysteresis.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from maverick_serve.autoscaling.policy import LoadTargetPolicy, TierSignals
from maverick_serve.config.autoscaling import TierScalingConfig

logger = logging.getLogger(__name__)
POLICY_PATH = "maverick_serve.autoscaling.serve_policy:TierAutoscaler"


class _DecisionMetrics:
    """maverick_autoscaler_desired_replicas{tier} and _decisions_total{tier,reason}, exported from
    Serve's controller through Ray's metrics agent (absent outside Ray: decisions are logged only)."""

    def __init__(self, tier: str) -> None:
        from ray.util import metrics

        self.tags = {"tier": tier}
        self.desired = metrics.Gauge(
            "maverick_autoscaler_desired_replicas", "Replicas the tier's policy asks for.", tag_keys=("tier",)
        )
        self.decisions = metrics.Counter(
            "maverick_autoscaler_decisions_total",
            "Autoscaling decisions by reason (up:*, down:*, hold:*, clamp).",
            tag_keys=("tier", "reason"),
        )

    def record(self, replicas: int, reason: str) -> None:
        self.desired.set(replicas, tags=self.tags)
        self.decisions.inc(1, tags={**self.tags, "reason": reason})


class TierAutoscaler:
    def __init__(self, tier: str, config: dict[str, Any]) -> None:
        self.tier = tier
        self.policy = LoadTargetPolicy(TierScalingConfig.model_validate(config))
        self.last_reason = ""
        self.metrics: _DecisionMetrics | None
        try:
            self.metrics = _DecisionMetrics(tier)
        except Exception:  # no Ray metrics agent (unit tests): decisions are still logged
            self.metrics = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics: dict[str, dict[Any, float]] = ctx.aggregated_metrics or {}
        running, waiting = metrics.get("running") or {}, metrics.get("waiting") or {}
        load: float | None
        if running:
            load = float(sum(running.values()) + sum(waiting.values()))
        elif ctx.current_num_replicas == 0:
            load = float(ctx.total_num_requests or 0.0)  # no replica to report: Serve's handle queue
        else:
            load = None  # replicas that have not reported yet: hold
        ttft = max((metrics.get("ttft_p95_s") or {}).values(), default=None)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        decision = self.policy.decide(TierSignals(now, ctx.target_num_replicas, load, 0.0, ttft))
        if decision.replicas != ctx.target_num_replicas or decision.reason != self.last_reason:
            logger.info(
                "autoscaler %s: %d -> %d replicas (%s, load %s)",
                self.tier,
                ctx.target_num_replicas,
                decision.replicas,
                decision.reason,
                load,
            )
        self.last_reason = decision.reason
        if self.metrics is not None:
            self.metrics.record(decision.replicas, decision.reason)
        return decision.replicas, {"reason": decision.reason, "load": load}
