"""Autoscaling settings per tier: bounds, what one replica can carry, SLOs, the hysteresis and
one GPU budget shared by the tiers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TierName = Literal["prefill", "engine", "router"]


class CapacityLearningConfig(BaseModel):
    """Learn `target_per_replica` from the tier's latency SLO (autoscaling/capacity.py): shrink it
    when a p95 breaks its SLO at no more than the target load, grow it when every p95 is well
    under its SLO at about the target load or more. Engine tier only (it reports latencies)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Learn the load one replica carries (needs an SLO on the tier).")
    min_target: float = Field(1.0, gt=0, description="The learned target never goes below this.")
    max_target: float = Field(64.0, gt=0, description="The learned target never goes above this.")
    interval_s: float = Field(
        60.0,
        gt=0,
        description="Seconds between two judgements of the target; latencies are not judged for half "
        "of it after a change, so at least 2 x autoscaling.signal_window_s (the latency window).",
    )
    shrink: float = Field(0.25, gt=0, lt=1, description="Fraction the target loses when the SLO breaks.")
    grow: float = Field(0.1, gt=0, lt=1, description="Fraction the target gains when latency has room.")
    headroom: float = Field(
        0.8, gt=0, lt=1, description="Grow only while every p95 is below headroom x its SLO."
    )

    @model_validator(mode="after")
    def _check(self) -> CapacityLearningConfig:
        if self.min_target > self.max_target:
            raise ValueError(f"min_target ({self.min_target}) exceeds max_target ({self.max_target})")
        return self


class TierScalingConfig(BaseModel):
    """One tier's policy. Load is the tier's own unit (engine: running + waiting requests; prefill:
    long-prompt tokens per second; router: ongoing requests); `target_per_replica` is what one
    replica should carry."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["load_target"] = Field("load_target", description="The policy (autoscaling/policy.py).")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_per_replica: float = Field(8.0, gt=0, description="Load one replica should carry.")
    up_band: float = Field(0.1, ge=0, lt=1, description="Scale up only above target x (1 + up_band).")
    down_band: float = Field(0.2, ge=0, lt=1, description="Scale down only below target x (1 - down_band).")
    stable_window_s: float = Field(30.0, gt=0, description="Load is averaged over this window.")
    panic_window_s: float = Field(6.0, gt=0, description="Short window that catches bursts.")
    panic_factor: float = Field(
        2.0, gt=1, description="Panic when the short-window load exceeds this x capacity."
    )
    upscale_cooldown_s: float = Field(10.0, ge=0, description="Seconds between two scale-ups (not in panic).")
    downscale_cooldown_s: float = Field(
        120.0, ge=0, description="Seconds after any change before scaling down."
    )
    max_step_up: int = Field(2, ge=1, description="Most replicas added at once.")
    max_step_down: int = Field(1, ge=1, description="Most replicas removed at once.")
    stale_after_s: float = Field(15.0, gt=0, description="Older signals hold the current count.")
    slo_ttft_p95_s: float | None = Field(None, gt=0, description="Scale up while TTFT p95 is above this.")
    slo_itl_p95_s: float | None = Field(
        None, gt=0, description="Scale up while inter-token p95 is above this."
    )
    kv_usage_high: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Scale up while the mean KV-cache usage is above this and requests wait (engine).",
    )
    learn_capacity: CapacityLearningConfig = Field(
        default_factory=CapacityLearningConfig,
        description="Learn target_per_replica from the SLOs instead of keeping the configured one.",
    )

    @model_validator(mode="after")
    def _check(self) -> TierScalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.panic_window_s > self.stable_window_s:
            raise ValueError("panic_window_s must not exceed stable_window_s")
        learn = self.learn_capacity
        if learn.enabled:
            if self.slo_ttft_p95_s is None and self.slo_itl_p95_s is None:
                raise ValueError("learn_capacity needs slo_ttft_p95_s or slo_itl_p95_s to learn from")
            if not learn.min_target <= self.target_per_replica <= learn.max_target:
                raise ValueError(
                    f"target_per_replica ({self.target_per_replica}) must lie within learn_capacity's "
                    f"[min_target, max_target] ([{learn.min_target}, {learn.max_target}])"
                )
        return self


# One PromQL label matcher (`name="value"`, `=`, `!=`, `=~` or `!~`), comma-separated.
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"^(?:{_MATCHER}(?:,{_MATCHER})*,?)?$")


class PrometheusSignalsConfig(BaseModel):
    """Optional, on clusters: the engine tier's TTFT and inter-token p95 from Prometheus, over
    every replica's histogram (`histogram_quantile` over `rate`), instead of the highest of the
    replicas' own windowed p95s. Load still comes from the replicas' pushes (fresher than a
    scrape). Fetched in the background by Serve's `PrometheusQueryMixin`; while Prometheus is
    unset, unreachable, stale or has no requests in the window, the pushed p95s are used.
    Authorisation headers come from `RAY_PROMETHEUS_HEADERS` (Ray's variable), never from here."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Take the engine tier's latency p95s from Prometheus.")
    address: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="Base URL of Prometheus (http[s]://host:port[/path]); None: RAY_PROMETHEUS_HOST of "
        "Serve's controller (the chart sets it on the head from monitoring.prometheusHost).",
    )
    selector: str = Field(
        "",
        description='PromQL label matchers added to each query, e.g. `ray_io_cluster="maverick"` when '
        "one Prometheus scrapes several clusters.",
    )
    window_s: float = Field(
        60.0, ge=10, description="Rate window of the quantiles; at least four scrape intervals."
    )
    fetch_interval_s: float = Field(5.0, gt=0, description="Seconds between two background queries.")
    max_age_s: float = Field(
        30.0, gt=0, description="Results older than this are not used (the pushed p95s are)."
    )

    @model_validator(mode="after")
    def _check(self) -> PrometheusSignalsConfig:
        if not _SELECTOR.match(self.selector):
            raise ValueError(
                f"autoscaling.prometheus.selector {self.selector!r} is not a list of PromQL label "
                'matchers like name="value", name=~"regex"'
            )
        if self.max_age_s < self.fetch_interval_s:
            raise ValueError(
                f"autoscaling.prometheus.max_age_s ({self.max_age_s}) is shorter than fetch_interval_s "
                f"({self.fetch_interval_s}): every result would be too old before the next one"
            )
        return self


def _router_default() -> TierScalingConfig:
    return TierScalingConfig(min_replicas=1, max_replicas=4, target_per_replica=128.0)


def _prefill_default() -> TierScalingConfig:
    # Scale to zero: without prefill replicas the engines prefill long prompts themselves.
    return TierScalingConfig(min_replicas=0, max_replicas=4, target_per_replica=20000.0)


class AutoscalingConfig(BaseModel):
    """Our policies instead of fixed replica counts (off: `resources.*.replicas` stay fixed)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Scale the router, engine and prefill tiers with our policies.")
    router: TierScalingConfig = Field(
        default_factory=_router_default, description="Router replicas; load = ongoing HTTP requests."
    )
    engine: TierScalingConfig = Field(
        default_factory=TierScalingConfig,
        description="Engine replicas (each with its expert workers); load = running + waiting requests.",
    )
    prefill: TierScalingConfig = Field(
        default_factory=_prefill_default,
        description="Prefill replicas (with disaggregation); load = long-prompt tokens per second.",
    )
    gpu_budget: float | None = Field(
        None,
        gt=0,
        description="Most `budget_resource` units all tiers together may ask for (None: only the "
        "per-tier maximums bound them).",
    )
    budget_resource: str = Field(
        "GPU",
        min_length=1,
        description="What the budget counts: GPU, or a custom resource that stands in for GPUs.",
    )
    give_up_first: list[TierName] = Field(
        default_factory=lambda: list[TierName](["prefill", "engine", "router"]),
        description="Order in which tiers give back replicas when their wishes exceed the budget.",
    )
    signal_window_s: float = Field(
        30.0,
        gt=0,
        description="Window of the TTFT / inter-token p95 and of the long-prompt token rate replicas report.",
    )
    metrics_push_interval_s: float = Field(
        2.0, gt=0, description="How often replicas push their autoscaling stats to Serve's controller."
    )
    prometheus: PrometheusSignalsConfig = Field(
        default_factory=PrometheusSignalsConfig,
        description="Optional: the engine tier's TTFT / inter-token p95 from Prometheus on a cluster.",
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        for tier in ("router", "prefill"):
            if getattr(self, tier).learn_capacity.enabled:
                raise ValueError(
                    f"autoscaling.{tier}.learn_capacity: only the engine tier reports the latencies "
                    "a capacity is learned from"
                )
        learn = self.engine.learn_capacity
        if learn.enabled and learn.interval_s < 2 * self.signal_window_s:
            raise ValueError(
                f"autoscaling.engine.learn_capacity.interval_s ({learn.interval_s}) is shorter than "
                f"2 x signal_window_s ({2 * self.signal_window_s}): a change would be judged on "
                "latencies from before the previous one"
            )
        return self
