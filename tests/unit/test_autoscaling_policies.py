"""Autoscaling policies driven by recorded signal traces (step, ramp, sawtooth, burst) on a fake clock."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from maverick_serve.autoscaling.budget import experts_for_engines, fit_gpu_budget
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


def test_experts_follow_engines_in_whole_ep_groups() -> None:
    assert experts_for_engines(1, 4, 4, 4, 16) == 4
    assert experts_for_engines(3, 2.5, 4, 4, 16) == 8
    assert experts_for_engines(9, 4, 4, 4, 16) == 16


def test_gpu_budget_is_never_exceeded() -> None:
    gpus = {"engine": 8.0, "experts": 1.0, "prefill": 4.0, "router": 0.0}
    minimum = {"engine": 1, "experts": 4, "prefill": 0, "router": 1}
    out = fit_gpu_budget({"engine": 3, "experts": 12, "prefill": 2, "router": 4}, gpus, minimum, budget=32)
    assert sum(n * gpus[t] for t, n in out.items()) <= 32
    assert out["prefill"] == 0 and out["router"] == 4 and out["engine"] >= 1
    with pytest.raises(ValueError, match="need 12 GPUs, above the budget of 8"):
        fit_gpu_budget({"engine": 1, "experts": 4}, gpus, minimum, budget=8)


def _ctx(target: int, running: dict[str, float] | None, waiting: dict[str, float] | None, queued: float = 0):
    from ray.serve.config import AutoscalingContext

    metrics = {"running": running or {}, "waiting": waiting or {}} if running is not None else {}
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="LlamaEngine",
        app_name="maverick",
        current_num_replicas=target,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=queued,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics={},
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
    assert scaler(_ctx(3, None, None)) == (3, {"reason": "hold:stale", "load": None})
    cold = TierAutoscaler("engine", {**CFG.model_dump(mode="json"), "min_replicas": 0})
    assert cold(_ctx(0, None, None, queued=5.0))[0] == 1  # from zero on Serve's queued requests


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="policy"):
        TierScalingConfig.model_validate({"policy": "magic"})
