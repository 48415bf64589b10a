"""Autoscaling policies driven by recorded signal traces (step, ramp, sawtooth, burst) on a fake clock."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from maverick_serve.autoscaling.budget import fit_gpu_budget
from maverick_serve.autoscaling.policy import Decision, LoadTargetPolicy, TierSignals
from maverick_serve.config.autoscaling import TierScalingConfig

TICK_S = 1.0
CFG = TierScalingConfig(min_replicas=1, max_replicas=8, target_per_replica=8.0)


def replay(
    cfg: TierScalingConfig, load: Callable[[float], float], seconds: float
) -> list[tuple[float, Decision]]:
    """Feed one signal per tick; replicas follow the decision at once (Serve's part)."""
    policy, replicas, out = LoadTargetPolicy(cfg), cfg.min_replicas, []
    for i in range(int(seconds / TICK_S)):
        now = i * TICK_S
        d = policy.decide(TierSignals(now=now, replicas=replicas, load=load(now)))
        replicas = d.replicas
        out.append((now, d))
    return out


def first_time(trace: list[tuple[float, Decision]], n: int, after: float = 0.0) -> float:
    return next(t for t, d in trace if t >= after and d.replicas == n)


def direction_changes(counts: list[int]) -> int:
    moves = [b - a for a, b in itertools.pairwise(counts) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


def test_step_scales_up_within_bound_and_back_down_after_the_cooldown() -> None:
    trace = replay(CFG, lambda t: 40.0 if 10 <= t < 300 else 4.0, 900)
    up = first_time(trace, 5, after=10) - 10
    # 1 → 5 replicas: ceil(40 / 8); steps of 2 every upscale_cooldown_s, panic on the way
    assert up <= 2 * CFG.upscale_cooldown_s + 2 * TICK_S
    assert max(d.replicas for _, d in trace) == 5
    down = first_time(trace, 1, after=300) - 300
    assert CFG.downscale_cooldown_s <= down <= 5 * CFG.downscale_cooldown_s + CFG.stable_window_s
    assert trace[-1][1].replicas == 1


def test_ramp_only_goes_up() -> None:
    trace = replay(CFG, lambda t: min(60.0, t / 5), 400)
    counts = [d.replicas for _, d in trace]
    assert counts == sorted(counts)
    # ceil(60 / 8) = 8, or 7 when 7 replicas sit inside the up band (7 x 8 x 1.1 > 60)
    assert counts[-1] in (math.ceil(60 / 8) - 1, math.ceil(60 / 8))


def test_steady_sawtooth_changes_direction_at_most_once() -> None:
    # ±15% around 3 replicas' worth, period 20 s: inside the dead bands
    trace = replay(CFG, lambda t: 24.0 * (1.15 if (t // 10) % 2 else 0.85), 600)
    counts = [d.replicas for t, d in trace if t >= 60]
    assert direction_changes(counts) <= 1
    assert set(counts) <= {3, 4}


def test_burst_panics_past_the_cooldown() -> None:
    cfg = CFG.model_copy(update={"upscale_cooldown_s": 60.0})
    trace = replay(cfg, lambda t: 80.0 if 30 <= t < 36 else 4.0, 60)
    during = [d for t, d in trace if 30 <= t < 36]
    assert during[0].reason == "up:load"  # and then the 60 s up cooldown runs
    assert "up:panic" in [d.reason for d in during[1:3]]
    assert max(d.replicas for d in during) >= 3


def test_stale_or_missing_signals_hold() -> None:
    policy = LoadTargetPolicy(CFG)
    assert policy.decide(TierSignals(now=0, replicas=3, load=None)) == Decision(3, "hold:stale")
    assert policy.decide(TierSignals(now=1, replicas=3, load=500, age_s=60)) == Decision(3, "hold:stale")


def test_slo_guard_scales_up_when_ttft_is_over_target() -> None:
    cfg = CFG.model_copy(update={"slo_ttft_p95_s": 1.0})
    policy = LoadTargetPolicy(cfg)
    d = policy.decide(TierSignals(now=0, replicas=2, load=16.0, ttft_p95_s=2.5))
    assert d == Decision(3, "up:slo")


def test_prefill_goes_to_zero_and_back() -> None:
    cfg = TierScalingConfig(min_replicas=0, max_replicas=4, target_per_replica=4096, downscale_cooldown_s=30)
    trace = replay(cfg, lambda t: 12000.0 if 20 <= t < 120 else 0.0, 400)
    assert trace[0][1].replicas == 0
    assert max(d.replicas for _, d in trace) == 3
    assert trace[-1][1].replicas == 0


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas (5) exceeds max_replicas (2)"),
        ({"slo_ttft_p95_s": 0}, "slo_ttft_p95_s"),
        ({"target_per_replica": -1}, "target_per_replica"),
    ],
)
def test_bad_settings_are_refused(update: dict[str, float], field: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(field)):
        TierScalingConfig.model_validate({**CFG.model_dump(), **update})


def test_gpu_budget_is_never_exceeded_and_no_tier_takes_from_another() -> None:
    costs = {"engine": 8.0, "prefill": 4.0, "router": 0.0}

    def fit(want: tuple[int, int, int], have: tuple[int, int, int], budget: float) -> tuple[int, ...]:
        tiers = ("engine", "prefill", "router")
        out = fit_gpu_budget(
            dict(zip(tiers, want, strict=True)),
            dict(zip(tiers, have, strict=True)),
            costs,
            {"engine": 1, "prefill": 0, "router": 1},
            budget,
            ("prefill", "engine", "router"),
        )
        assert sum(n * costs[t] for t, n in out.items()) <= (budget or 1e9)
        return tuple(out[t] for t in tiers)

    # Everyone wants more than fits: growth goes router, engine, prefill round robin inside 32.
    assert fit((4, 3, 4), (1, 0, 1), 32) == (3, 2, 4)
    # Prefill holds 2 (8 units) and engines want a 4th: the 40 units do not fit, so engines wait;
    # prefill is not pushed down to make room (two tiers fighting would oscillate).
    assert fit((4, 2, 1), (3, 2, 1), 32) == (3, 2, 1)
    # The budget was lowered under what runs: prefill gives back first, never below minimums.
    assert fit((3, 2, 1), (3, 2, 1), 16) == (2, 0, 1)
    assert fit_gpu_budget({"engine": 9}, {"engine": 1}, costs, {}, None) == {"engine": 9}


def test_budget_that_cannot_hold_the_minimums_is_refused_at_build() -> None:
    from maverick_serve.config.cluster import ClusterConfig

    base = {
        "resources": {"engine": {"custom_resources": {"fake_gpu": 1}}},
        "experts": {"mode": "disaggregated", "ep_degree": 2, "worker_custom_resources": {"fake_gpu": 1}},
    }
    ok = ClusterConfig.model_validate(
        {**base, "autoscaling": {"enabled": True, "budget_resource": "fake_gpu", "gpu_budget": 6}}
    )
    assert ok.scaling_costs() == {"router": 0.0, "engine": 1.0}
    assert ok.fixed_scaling_units() == 2.0  # the shared EP group of 2 expert workers
    with pytest.raises(ValidationError, match=re.escape("gpu_budget=3 fake_gpu cannot hold the tiers' min")):
        ClusterConfig.model_validate(
            {
                **base,
                "autoscaling": {
                    "enabled": True,
                    "budget_resource": "fake_gpu",
                    "gpu_budget": 3,
                    "engine": {"min_replicas": 2},
                },
            }
        )


def test_kv_pressure_scales_up_only_while_requests_wait() -> None:
    cfg = CFG.model_copy(update={"kv_usage_high": 0.9})
    policy = LoadTargetPolicy(cfg)
    calm = policy.decide(TierSignals(now=0, replicas=2, load=14.0, kv_usage=0.95, waiting=0))
    assert calm == Decision(2, "hold:band")
    full = policy.decide(TierSignals(now=1, replicas=2, load=14.0, kv_usage=0.95, waiting=3))
    assert full == Decision(3, "up:kv")


def test_latency_window_p95_forgets_old_samples() -> None:
    from maverick_serve.serving.latency_window import LatencyWindow

    now = [0.0]
    window = LatencyWindow(10.0, clock=lambda: now[0])
    assert window.p95() is None
    for i in range(1, 101):
        window.add(i / 100)
    assert window.p95() == pytest.approx(0.95)
    now[0] = 11.0
    window.add(0.2)
    assert window.p95() == pytest.approx(0.2)


def _ctx(
    target: int,
    running: dict[str, float] | None,
    waiting: dict[str, float] | None,
    queued: float = 0,
    name: str = "LlamaEngine",
    metrics: dict[str, dict[str, float]] | None = None,
    raw: dict[str, Any] | None = None,
):
    from ray.serve.config import AutoscalingContext

    if metrics is None:
        metrics = {"running": running or {}, "waiting": waiting or {}} if running is not None else {}
    return AutoscalingContext(
        deployment_id=name,
        deployment_name=name,
        app_name="maverick",
        current_num_replicas=target,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=queued,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics=raw or {},
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=100.0,
        config=None,
    )


def test_serve_adapter_reads_replica_stats_and_holds_without_them() -> None:
    from maverick_serve.autoscaling.serve_policy import TierAutoscaler

    scaler = TierAutoscaler("engine", CFG.model_dump(mode="json"))
    n, state = scaler(_ctx(1, {"r1": 20.0}, {"r1": 20.0}))
    assert (n, state["reason"], state["load"]) == (3, "up:panic", 40.0)  # 40 > 2 x 8: panic, step of 2
    assert scaler(_ctx(3, None, None)) == (
        3,
        {"reason": "hold:stale", "load": None, "target_per_replica": 8.0},
    )
    cold = TierAutoscaler("engine", {**CFG.model_dump(mode="json"), "min_replicas": 0})
    assert cold(_ctx(0, None, None, queued=5.0))[0] == 1  # from zero on Serve's queued requests


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="policy"):
        TierScalingConfig.model_validate({"policy": "magic"})


def test_stale_replica_reports_hold() -> None:
    from ray.serve._private.common import TimeStampedValue

    from maverick_serve.autoscaling.serve_policy import TierAutoscaler

    scaler = TierAutoscaler("engine", CFG.model_dump(mode="json"))
    old = {"running": {"r1": [TimeStampedValue(100.0 - 60, 40.0)]}}  # current_time is 100
    n, state = scaler(_ctx(1, {"r1": 40.0}, {"r1": 0.0}, raw=old))
    assert (n, state["reason"]) == (1, "hold:stale")


def test_app_policy_starts_prefill_from_the_routers_count_inside_the_budget() -> None:
    from maverick_serve.autoscaling.serve_policy import ClusterAutoscaler
    from maverick_serve.serving.builder import TIER_OF_DEPLOYMENT

    gpu = {"custom_resources": {"fake_gpu": 1}}
    cluster = {
        "kvtier": {"store": {"type": "redis"}},
        "disaggregation": {"enabled": True, "prefill": gpu},
        "resources": {"engine": gpu},
        "autoscaling": {
            "enabled": True,
            "gpu_budget": 3,
            "budget_resource": "fake_gpu",
            "engine": CFG.model_copy(update={"max_replicas": 3}).model_dump(),
            "prefill": {"min_replicas": 0, "max_replicas": 2, "target_per_replica": 1000.0},
        },
    }
    scaler = ClusterAutoscaler(TIER_OF_DEPLOYMENT, cluster)
    contexts = {
        "Router": _ctx(
            1, None, None, queued=10, name="Router", metrics={"prefill_tokens_per_s": {"a": 5000.0}}
        ),
        "LlamaEngine": _ctx(1, {"r1": 30.0}, {"r1": 10.0}),
        "LlamaPrefill": _ctx(0, None, None, name="LlamaPrefill"),
    }
    out, state = scaler(contexts)
    # engine wants 3 (panic on 40), prefill 2 (5000 tokens / 1000, step 2): 5 > 3 units; engines
    # come first, so the budget leaves 2 engines + 1 prefill.
    assert out == {"Router": 1, "LlamaEngine": 2, "LlamaPrefill": 1}
    assert state["LlamaEngine"]["reason"] == "budget" and state["LlamaPrefill"]["reason"] == "budget"
    assert state["LlamaPrefill"]["load"] == 5000.0


def test_a_replica_too_busy_to_report_is_covered_by_serves_request_count() -> None:
    from ray.serve._private.common import TimeStampedValue

    from maverick_serve.autoscaling.serve_policy import engine_signals

    old = {"running": {"r1": [TimeStampedValue(100.0 - 60, 1.0)]}}  # its last push is a minute old
    signals = engine_signals(_ctx(1, {"r1": 1.0}, {"r1": 0.0}, queued=9, raw=old), now=100.0)
    assert (signals.load, signals.age_s) == (9.0, 0.0)
    fresh = {
        "running": {"r1": [TimeStampedValue(99.5, 6.0)]},
        "waiting": {"r1": [TimeStampedValue(99.5, 4.0)]},
    }
    assert engine_signals(_ctx(1, {}, {}, queued=3, raw=fresh), now=100.0).load == 10.0
