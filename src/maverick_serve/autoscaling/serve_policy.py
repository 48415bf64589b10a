"""Our policies inside Ray Serve's controller.

`ClusterAutoscaler` is the application-level policy (`autoscaling_policy` of the Serve app in a
config file, the chart's serveConfigV2 and `maverick-serve up`): it sees every scaled deployment
at once, so it can feed the router's counts to the prefill tier and hold all tiers inside one GPU
budget. `TierAutoscaler` is the same per-tier policy as a deployment-level policy, set by the
builder so that an app started with `serve.run` (no app-level policy possible there) still scales
each tier by our rules, without the shared budget. When both are present Serve runs the
application-level one.

Both are built once per app (or deployment) by Serve and called every control-loop tick with
`AutoscalingContext`s; replicas feed them through `record_autoscaling_stats`. The builder sets
Serve's own delays to 0, so the policy's cooldowns are the only hysteresis.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from maverick_serve.autoscaling.budget import fit_gpu_budget
from maverick_serve.autoscaling.learned_store import LearnedTargetStore, RayKvTargetStore
from maverick_serve.autoscaling.policy import Decision, LoadTargetPolicy
from maverick_serve.autoscaling.prometheus_signals import PrometheusLatencies, with_latencies
from maverick_serve.autoscaling.signals import TierSignals
from maverick_serve.config.autoscaling import PrometheusSignalsConfig, TierScalingConfig
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.observability.catalogue import AUTOSCALER_METRICS
from maverick_serve.observability.ray_metrics import MetricSet

# Under ray.serve so that decisions land in the controller's log (the dashboard's Serve view).
logger = logging.getLogger("ray.serve.maverick.autoscaler")
TIER_POLICY_PATH = "maverick_serve.autoscaling.serve_policy:TierAutoscaler"
APP_POLICY_PATH = "maverick_serve.autoscaling.serve_policy:ClusterAutoscaler"


class _DecisionMetrics:
    """maverick_autoscaler_desired_replicas{tier}, _load{tier} and _decisions_total{tier,reason}
    (catalogue specs), exported from Serve's controller through Ray's metrics agent."""

    def __init__(self) -> None:
        self.m = MetricSet(AUTOSCALER_METRICS)

    def record(self, tier: str, replicas: int, reason: str, load: float | None, target: float) -> None:
        self.m.set("maverick_autoscaler_desired_replicas", replicas, {"tier": tier})
        self.m.set("maverick_autoscaler_target_per_replica", target, {"tier": tier})
        if load is not None:
            self.m.set("maverick_autoscaler_load", load, {"tier": tier})
        self.m.inc("maverick_autoscaler_decisions", 1, {"tier": tier, "reason": reason})


def _metrics_or_none() -> _DecisionMetrics | None:
    metrics = _DecisionMetrics()
    return metrics if metrics.m.enabled else None  # outside Ray decisions are still logged


def _values(ctx: Any, name: str) -> list[float]:
    """The newest value of `name` per replica. Serve's aggregate is a mean over its look-back
    period; the policy keeps its own windows, so it reads the raw series where there is one."""
    series = (ctx.raw_metrics or {}).get(name) or {}
    if series:
        return [float(max(points, key=lambda p: p.timestamp).value) for points in series.values() if points]
    return [float(v) for v in ((ctx.aggregated_metrics or {}).get(name) or {}).values()]


def _age_s(ctx: Any, name: str, now: float) -> float:
    """Age of the newest report of `name` across the deployment's replicas (0 when unknown)."""
    series = (ctx.raw_metrics or {}).get(name) or {}
    stamps = [p.timestamp for points in series.values() for p in points]
    return max(0.0, now - max(stamps)) if stamps else 0.0


def _now(ctx: Any) -> float:
    return float(ctx.current_time) if ctx.current_time is not None else time.time()


def engine_signals(ctx: Any, now: float, stale_after_s: float = 15.0) -> TierSignals:
    """Running + waiting requests. Replicas report them with KV usage and latencies; Serve's own
    count of requests the routers' handles have ongoing at the engines covers a replica too busy
    to push its stats in time (a saturated engine is exactly when they lag) and a tier at zero."""
    running, waiting = _values(ctx, "running"), _values(ctx, "waiting")
    age = _age_s(ctx, "running", now)
    handled = float(ctx.total_num_requests or 0.0)
    reported = sum(running) + sum(waiting) if running and age <= stale_after_s else None
    load: float | None
    if reported is not None:
        load = max(reported, handled)
    elif handled > 0 or ctx.current_num_replicas == 0:
        load, age = handled, 0.0
    else:
        load = None  # no fresh report and nothing ongoing that Serve knows of: hold
    kv = _values(ctx, "kv_usage")
    # Latencies come in the same push as `running`: a stale push's are stale too (the SLO guard
    # and learned capacity must not act on them).
    fresh = reported is not None
    return TierSignals(
        now=now,
        replicas=ctx.target_num_replicas,
        load=load,
        age_s=age,
        ttft_p95_s=max(_values(ctx, "ttft_p95_s"), default=None) if fresh else None,
        itl_p95_s=max(_values(ctx, "itl_p95_s"), default=None) if fresh else None,
        kv_usage=sum(kv) / len(kv) if kv else None,
        waiting=sum(waiting),
        running=None if ctx.running_replicas is None else len(ctx.running_replicas),
    )


def router_signals(ctx: Any, now: float) -> TierSignals:
    # Serve counts the requests its proxies' handles have queued or running on the routers.
    return TierSignals(now=now, replicas=ctx.target_num_replicas, load=float(ctx.total_num_requests or 0.0))


def prefill_signals(ctx: Any, now: float, router_ctx: Any | None) -> TierSignals:
    """Long-prompt tokens per second. The routers count them whether or not prefill replicas
    exist (without any, the engines prefill those prompts themselves), which is what lets the
    tier start from zero; without the routers' view, what the prefill replicas compute is used."""
    load: float | None
    if router_ctx is not None and (demand := _values(router_ctx, "prefill_tokens_per_s")):
        load, age = sum(demand), _age_s(router_ctx, "prefill_tokens_per_s", now)
    elif own := _values(ctx, "prefill_tokens_per_s"):
        load, age = sum(own), _age_s(ctx, "prefill_tokens_per_s", now)
    elif ctx.current_num_replicas == 0:
        load, age = 0.0, 0.0  # at zero with no demand reported: stays at zero
    else:
        load, age = None, 0.0
    return TierSignals(now=now, replicas=ctx.target_num_replicas, load=load, age_s=age)


def tier_signals(
    tier: str,
    ctx: Any,
    cfg: TierScalingConfig,
    router_ctx: Any | None,
    prometheus: PrometheusLatencies | None = None,
) -> TierSignals:
    """The signals of `tier` from its deployment's context (prefill also reads the routers'; the
    engine tier's latency p95s come from Prometheus where that is configured and answering)."""
    now = _now(ctx)
    if tier == "engine":
        signals = engine_signals(ctx, now, cfg.stale_after_s)
        return signals if prometheus is None else with_latencies(signals, prometheus.latest())
    if tier == "prefill":
        return prefill_signals(ctx, now, router_ctx)
    return router_signals(ctx, now)


def _prometheus_or_none(cfg: PrometheusSignalsConfig | None) -> PrometheusLatencies | None:
    return PrometheusLatencies(cfg) if cfg is not None and cfg.enabled else None


def _log_change(tier: str, before: int, decision: Decision, load: float | None, last: str) -> None:
    if decision.replicas != before or decision.reason != last:
        logger.info(
            "autoscaler %s: %d -> %d replicas (%s, load %s)",
            tier,
            before,
            decision.replicas,
            decision.reason,
            load,
        )


class LearnedTargets:
    """Keeps each tier's learned target in a `LearnedTargetStore` under "<app>/<tier>": resumed
    on the tier's first tick (a restarted controller), saved on every change."""

    def __init__(self, store: LearnedTargetStore) -> None:
        self.store = store
        self.resumed: set[str] = set()

    @staticmethod
    def basis(cfg: TierScalingConfig) -> dict[str, Any]:
        """The settings a target is learned under; a change to any of them starts afresh."""
        return cfg.model_dump(
            mode="json",
            include={
                "target_per_replica",
                "up_band",
                "down_band",
                "slo_ttft_p95_s",
                "slo_itl_p95_s",
                "learn_capacity",
            },
        )

    def resume(self, app: str, tier: str, policy: LoadTargetPolicy) -> None:
        if tier in self.resumed or not policy.cfg.learn_capacity.enabled:
            return
        self.resumed.add(tier)
        stored = self.store.load(f"{app}/{tier}", self.basis(policy.cfg))
        if stored is not None:
            logger.info(
                "autoscaler %s: target_per_replica %.3g resumed (learned before this controller started)",
                tier,
                policy.capacity.resume(stored),
            )

    def save(self, app: str, tier: str, policy: LoadTargetPolicy) -> None:
        self.store.save(f"{app}/{tier}", policy.target, self.basis(policy.cfg))


def _decide(
    tier: str, policy: LoadTargetPolicy, signals: TierSignals, learned: LearnedTargets, app: str
) -> Decision:
    """The policy's decision; a change of the learned capacity is logged with what it was judged
    on and stored."""
    learned.resume(app, tier, policy)
    before = policy.target
    decision = policy.decide(signals)
    if policy.target != before:
        learned.save(app, tier, policy)
        if (judged := policy.capacity.judged) is not None:
            logger.info(
                "autoscaler %s: target_per_replica %.3g -> %.3g (learned: worst p95 / SLO %.2f at %.3g "
                "per running replica over the interval)",
                tier,
                before,
                policy.target,
                *judged,
            )
    return decision


class TierAutoscaler:
    """Deployment-level: one tier, its own signals, no shared budget."""

    def __init__(
        self,
        tier: str,
        config: dict[str, Any],
        prometheus: dict[str, Any] | None = None,
        store: LearnedTargetStore | None = None,
    ) -> None:
        self.tier = tier
        self.learned = LearnedTargets(store or RayKvTargetStore())
        self.policy = LoadTargetPolicy(TierScalingConfig.model_validate(config))
        self.prometheus = _prometheus_or_none(
            None if prometheus is None else PrometheusSignalsConfig.model_validate(prometheus)
        )
        self.last_reason = ""
        self.metrics = _metrics_or_none()

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        signals = tier_signals(self.tier, ctx, self.policy.cfg, None, self.prometheus)
        decision = _decide(self.tier, self.policy, signals, self.learned, ctx.app_name)
        _log_change(self.tier, ctx.target_num_replicas, decision, signals.load, self.last_reason)
        self.last_reason = decision.reason
        target = self.policy.target
        if self.metrics is not None:
            self.metrics.record(self.tier, decision.replicas, decision.reason, signals.load, target)
        return decision.replicas, {
            "reason": decision.reason,
            "load": signals.load,
            "target_per_replica": target,
        }


class ClusterAutoscaler:
    """Application-level: every tier's policy, then one GPU budget across them.

    `deployments` maps the app's deployment names to tiers (router, engine, prefill); `cluster`
    is the app's `ClusterConfig` (the same args the app is built from), which gives the tiers'
    settings and what one replica of each holds of the budget resource. Deployments not in the
    map keep their count."""

    def __init__(
        self, deployments: dict[str, str], cluster: dict[str, Any], store: LearnedTargetStore | None = None
    ) -> None:
        config = ClusterConfig.model_validate(cluster)
        self.learned = LearnedTargets(store or RayKvTargetStore())
        self.cfg = config.autoscaling
        self.costs = config.scaling_costs()
        self.group_costs = config.scaling_group_costs()  # expert groups that follow the engines
        # Expert workers shared by every engine replica hold their part always; groups that follow
        # the engines (experts.engines_per_group) are counted with the engine tier instead.
        self.budget = (
            None if self.cfg.gpu_budget is None else self.cfg.gpu_budget - config.fixed_scaling_units()
        )
        self.tiers = {name: tier for name, tier in deployments.items() if tier in self.costs}
        self.colocated = config.router.colocated
        self.policies = {tier: LoadTargetPolicy(getattr(self.cfg, tier)) for tier in self.tiers.values()}
        self.prometheus = _prometheus_or_none(self.cfg.prometheus)
        self.last_reason: dict[str, str] = {}
        self.metrics = _metrics_or_none()

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        by_tier = {
            self.tiers[ctx.deployment_name]: (dep, ctx)
            for dep, ctx in contexts.items()
            if ctx.deployment_name in self.tiers
        }
        # Colocated routers report their long-prompt demand from the engine replicas they live in.
        router_tier = "engine" if self.colocated else "router"
        router_ctx = by_tier.get(router_tier, (None, None))[1]
        decisions: dict[str, Decision] = {}
        loads: dict[str, float | None] = {}
        for tier, (_, ctx) in by_tier.items():
            signals = tier_signals(tier, ctx, getattr(self.cfg, tier), router_ctx, self.prometheus)
            decision = _decide(tier, self.policies[tier], signals, self.learned, ctx.app_name)
            decisions[tier], loads[tier] = decision, signals.load
        current = {tier: ctx.target_num_replicas for tier, (_, ctx) in by_tier.items()}
        fitted = fit_gpu_budget(
            {t: d.replicas for t, d in decisions.items()},
            current,
            self.costs,
            {t: getattr(self.cfg, t).min_replicas for t in decisions},
            self.budget,
            self.cfg.give_up_first,
            self.group_costs,
        )
        out: dict[Any, int] = {}
        state: dict[Any, dict[str, Any]] = {}
        for tier, (dep, _) in by_tier.items():
            decision = decisions[tier]
            if fitted[tier] != decision.replicas:
                decision = Decision(fitted[tier], "budget")
            _log_change(tier, current[tier], decision, loads[tier], self.last_reason.get(tier, ""))
            self.last_reason[tier] = decision.reason
            target = self.policies[tier].target
            if self.metrics is not None:
                self.metrics.record(tier, decision.replicas, decision.reason, loads[tier], target)
            out[dep] = decision.replicas
            state[dep] = {"reason": decision.reason, "load": loads[tier], "target_per_replica": target}
        return out, state
