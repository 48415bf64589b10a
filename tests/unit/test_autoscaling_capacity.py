"""Learned capacity (autoscaling/capacity.py) against a simulated engine tier on a fake clock.

The plant: a constant load of requests spread over the replicas Serve runs (they follow each
decision at once); TTFT p95 is a steep function of the load per replica, measured over the last
30 s (the replicas' latency window), and breaks the 1 s SLO above `CAPACITY` requests per replica.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque

import pytest
from pydantic import ValidationError

from maverick_serve.autoscaling.capacity import CapacityLearner
from maverick_serve.autoscaling.policy import LoadTargetPolicy, TierSignals
from maverick_serve.config.autoscaling import AutoscalingConfig, CapacityLearningConfig, TierScalingConfig

CAPACITY = 6.0  # requests one replica carries within the SLO
SLO_S = 1.0
LATENCY_WINDOW_S = 30.0


def ttft_p95(per_replica: float) -> float:
    return 0.25 + 0.75 * (per_replica / CAPACITY) ** 3  # == SLO_S at CAPACITY


def tier(target: float, learn: bool, **learn_settings: float) -> TierScalingConfig:
    return TierScalingConfig(
        min_replicas=1,
        max_replicas=16,
        target_per_replica=target,
        slo_ttft_p95_s=SLO_S,
        learn_capacity=CapacityLearningConfig(
            enabled=learn, min_target=1.0, max_target=32.0, **learn_settings
        ),
    )


def simulate(
    cfg: TierScalingConfig, load: float, seconds: int
) -> tuple[LoadTargetPolicy, list[tuple[int, int, float]]]:
    """(policy, [(t, replicas, ttft p95)]) with one decision a second."""
    policy, replicas = LoadTargetPolicy(cfg), cfg.min_replicas
    window: deque[tuple[int, float]] = deque()
    out = []
    for t in range(seconds):
        window.append((t, load / replicas))
        while t - window[0][0] >= LATENCY_WINDOW_S:
            window.popleft()
        p95 = ttft_p95(sum(per for _, per in window) / len(window))
        replicas = policy.decide(
            TierSignals(now=float(t), replicas=replicas, load=load, ttft_p95_s=p95)
        ).replicas
        out.append((t, replicas, p95))
    return policy, out


def direction_changes(counts: list[int]) -> int:
    moves = [b - a for a, b in itertools.pairwise(counts) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


def test_a_target_set_too_high_flaps_without_learning_and_settles_with_it() -> None:
    # 48 requests; the operator guessed 16 per replica, the replicas carry 6 within the SLO.
    _, fixed = simulate(tier(16.0, learn=False), 48.0, 3600)
    late = [n for t, n, _ in fixed if t >= 600]
    # The SLO guard adds replicas, the load rule (48 / 16 = 3) takes them away again: 7-9 forever.
    assert direction_changes(late) >= 10
    assert max(p95 for t, _, p95 in fixed if t >= 600) > SLO_S

    policy, learned = simulate(tier(16.0, learn=True), 48.0, 3600)
    # Shrunk on the first breaches (overshooting to ~4), grown back while p95 had room: by 15 min
    # it holds 8 replicas (48 / 6, the fewest that meet the SLO) for good.
    late = [n for t, n, _ in learned if t >= 900]
    assert set(late) == {8}
    assert max(p95 for t, _, p95 in learned if t >= 900 + LATENCY_WINDOW_S) <= SLO_S
    assert 0.75 * CAPACITY <= policy.target <= 1.25 * CAPACITY  # ceil(48 / target) == 8


def test_a_target_set_too_low_grows_towards_capacity_without_breaking_the_slo() -> None:
    # The operator guessed 2 per replica: 16 replicas (the maximum) where 8-9 would do.
    fixed_policy, fixed = simulate(tier(2.0, learn=False), 48.0, 3600)
    assert fixed[-1][1] == 16 and fixed_policy.target == 2.0

    policy, learned = simulate(tier(2.0, learn=True), 48.0, 3600)
    replicas = [n for t, n, _ in learned if t >= 60]
    assert replicas[0] == 16 and replicas[-1] == 8  # grown to carry 6 each: 48 / 6
    assert replicas == sorted(replicas, reverse=True)  # only down, no flapping on the way
    assert max(p95 for t, _, p95 in learned if t >= 60) <= SLO_S
    assert 0.75 * CAPACITY <= policy.target <= 1.25 * CAPACITY


def test_changes_are_rate_limited_bounded_and_need_evidence() -> None:
    cfg = tier(8.0, learn=True, interval_s=60.0, shrink=0.5)
    learner = CapacityLearner(cfg)
    broken = {"ttft_p95_s": 5.0}

    def tick(t: int) -> str | None:  # 8 requests on the replicas the target asks for, SLO broken
        replicas = math.ceil(8.0 / learner.target)
        return learner.observe(TierSignals(now=float(t), replicas=replicas, load=8.0, **broken))

    # Nothing before a whole interval of signals, then one change per interval.
    moves = [tick(t) for t in range(121)]
    assert [t for t, m in enumerate(moves) if m] == [60, 120]
    assert moves[60] == "learn:shrink"
    assert learner.target == pytest.approx(2.0)  # 8 x 0.5, twice
    for t in range(121, 600):
        tick(t)
    assert learner.target == 1.0  # min_target
    # Serve's target is 4 replicas (4 requests each) but 1 runs, the others still start: it
    # carries all 16, twice the target, so the breach is not the target's.
    starting = CapacityLearner(cfg)
    for t in range(300):
        signal = TierSignals(now=float(t), replicas=4, running=1, load=16.0, **broken)
        assert starting.observe(signal) is None
    assert starting.target == 8.0
    busy = CapacityLearner(cfg)
    for t in range(300):
        assert busy.observe(TierSignals(now=float(t), replicas=1, load=12.0, **broken)) is None
    assert busy.target == 8.0

    # Fast at a load far below the target says nothing about capacity; zero-replica or missing
    # load and missing latencies say nothing at all.
    for signal in (
        {"replicas": 4, "load": 4.0, "ttft_p95_s": 0.1},
        {"replicas": 0, "load": 40.0, "ttft_p95_s": 9.0},
        {"replicas": 2, "load": None, "ttft_p95_s": 9.0},
        {"replicas": 1, "load": 40.0},
    ):
        idle = CapacityLearner(tier(8.0, learn=True))
        for t in range(600):
            assert idle.observe(TierSignals(now=float(t), **signal)) is None  # type: ignore[arg-type]
        assert idle.target == 8.0

    off = CapacityLearner(tier(8.0, learn=False))
    for t in range(600):
        assert off.observe(TierSignals(now=float(t), replicas=1, load=40.0, ttft_p95_s=9.0)) is None
    assert off.target == 8.0


def run(learner: CapacityLearner, seconds: range, **signal: float) -> list[str | None]:
    return [learner.observe(TierSignals(now=float(t), **signal)) for t in seconds]  # type: ignore[arg-type]


def test_one_breach_at_a_light_load_costs_one_step_not_the_target() -> None:
    # 24 per replica configured; a cold replica's slow first requests at 2 per replica.
    learner = CapacityLearner(tier(24.0, learn=True))
    moves = run(learner, range(61), replicas=1, load=2.0, ttft_p95_s=3.0)
    assert moves[60] == "learn:shrink" and learner.target == pytest.approx(18.0)  # 24 x 0.75, not 2
    assert learner.judged == (3.0, 2.0)  # worst p95 / SLO, mean load per running replica


def test_latencies_from_before_a_change_are_not_judged() -> None:
    learner = CapacityLearner(tier(8.0, learn=True))
    assert run(learner, range(61), replicas=1, load=8.0, ttft_p95_s=2.0)[60] == "learn:shrink"  # to 6
    # The window still shows the old breach for 30 s after the change, then latency is inside
    # the SLO but without the room to grow: the judgement at 120 changes nothing.
    run(learner, range(61, 90), replicas=1, load=6.0, ttft_p95_s=2.0)
    assert run(learner, range(90, 121), replicas=1, load=6.0, ttft_p95_s=0.9) == [None] * 31
    assert learner.target == pytest.approx(6.0)


def test_a_first_reading_after_an_idle_spell_waits_for_the_next_judgement() -> None:
    learner = CapacityLearner(tier(8.0, learn=True))
    assert run(learner, range(200), replicas=1, load=8.0) == [None] * 200  # no latencies at all
    # One slow reading at 200 is not judged alone at once, but with what follows at 240.
    assert run(learner, range(200, 201), replicas=1, load=8.0, ttft_p95_s=9.0) == [None]
    assert run(learner, range(201, 241), replicas=1, load=8.0, ttft_p95_s=0.9)[-1] == "learn:shrink"


def test_growth_is_capped_at_max_target() -> None:
    cfg = tier(8.0, learn=True).model_copy(
        update={"learn_capacity": CapacityLearningConfig(enabled=True, max_target=9.0)}
    )
    learner = CapacityLearner(cfg)
    assert run(learner, range(61), replicas=1, load=8.0, ttft_p95_s=0.2)[60] == "learn:grow"
    assert learner.target == pytest.approx(8.8)
    run(learner, range(61, 600), replicas=1, load=9.0, ttft_p95_s=0.2)
    assert learner.target == 9.0


def test_the_serve_adapter_reports_the_learned_target() -> None:
    from test_autoscaling_policies import _ctx

    from maverick_serve.autoscaling.serve_policy import TierAutoscaler

    cfg = tier(8.0, learn=True).model_dump(mode="json")
    scaler = TierAutoscaler("engine", cfg)
    metrics = {"running": {"r1": 8.0, "r2": 8.0}, "waiting": {}, "ttft_p95_s": {"r1": 3.0, "r2": 0.5}}
    states = []
    for t in range(61):
        ctx = _ctx(2, None, None, metrics=metrics)
        ctx.running_replicas, ctx.current_time = ["r1", "r2"], 100.0 + t
        states.append(scaler(ctx)[1])
    assert states[0]["target_per_replica"] == 8.0
    assert states[-1]["target_per_replica"] == pytest.approx(6.0)  # r1's p95 broke the 1 s SLO
    assert scaler.policy.target == pytest.approx(6.0)


def test_itl_slo_alone_is_enough_to_learn_from() -> None:
    cfg = TierScalingConfig(
        target_per_replica=8.0,
        slo_itl_p95_s=0.05,
        learn_capacity=CapacityLearningConfig(enabled=True, interval_s=30.0),
    )
    learner = CapacityLearner(cfg)
    for t in range(31):
        learner.observe(TierSignals(now=float(t), replicas=2, load=16.0, itl_p95_s=0.2))
    assert learner.target == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"engine": {"learn_capacity": {"enabled": True}}},
            "learn_capacity needs slo_ttft_p95_s or slo_itl_p95_s",
        ),
        (
            {
                "engine": {
                    "slo_ttft_p95_s": 1,
                    "learn_capacity": {"enabled": True, "min_target": 9, "max_target": 4},
                }
            },
            "min_target (9.0) exceeds max_target (4.0)",
        ),
        (
            {"engine": {"slo_ttft_p95_s": 1, "learn_capacity": {"enabled": True, "min_target": 10}}},
            "target_per_replica (8.0) must lie within learn_capacity's [min_target, max_target] "
            "([10.0, 64.0])",
        ),
        (
            {"router": {"slo_ttft_p95_s": 1, "learn_capacity": {"enabled": True}}},
            "autoscaling.router.learn_capacity: only the engine tier",
        ),
        (
            {"prefill": {"slo_ttft_p95_s": 1, "learn_capacity": {"enabled": True}}},
            "autoscaling.prefill.learn_capacity: only the engine tier",
        ),
        (
            {"engine": {"slo_ttft_p95_s": 1, "learn_capacity": {"enabled": True, "interval_s": 10}}},
            "learn_capacity.interval_s (10.0) is shorter than 2 x signal_window_s (60.0)",
        ),
        ({"engine": {"learn_capacity": {"shrink": 1.5}}}, "learn_capacity.shrink"),
    ],
)
def test_bad_learning_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        AutoscalingConfig.model_validate({"enabled": True, **settings})


def test_a_restarted_controller_resumes_the_learned_target_unless_the_settings_changed() -> None:
    from test_autoscaling_policies import _ctx

    from maverick_serve.autoscaling.learned_store import MemoryTargetStore
    from maverick_serve.autoscaling.serve_policy import TierAutoscaler

    store = MemoryTargetStore()
    cfg = tier(8.0, learn=True).model_dump(mode="json")
    metrics = {"running": {"r1": 8.0, "r2": 8.0}, "waiting": {}, "ttft_p95_s": {"r1": 3.0, "r2": 0.5}}

    def tick(scaler: TierAutoscaler, t: float) -> float:
        ctx = _ctx(2, None, None, metrics=metrics)
        ctx.running_replicas, ctx.current_time = ["r1", "r2"], 100.0 + t
        return float(scaler(ctx)[1]["target_per_replica"])

    first = TierAutoscaler("engine", cfg, store=store)
    assert [tick(first, t) for t in range(61)][-1] == pytest.approx(6.0)
    assert list(store.values) == ["maverick/engine"]  # <app>/<tier>
    restarted = TierAutoscaler("engine", cfg, store=store)
    assert tick(restarted, 0) == pytest.approx(6.0)  # not the configured 8 again
    changed = TierAutoscaler("engine", {**cfg, "slo_ttft_p95_s": 2.0}, store=store)
    assert tick(changed, 0) == 8.0  # learned under another SLO: starts from the configuration
    no_learning = TierAutoscaler("engine", tier(8.0, learn=False).model_dump(mode="json"), store=store)
    assert tick(no_learning, 0) == 8.0


@pytest.mark.parametrize(
    "raw", ["not json", '{"target": "NaN", "basis": {}}', '{"target": -1, "basis": {}}', "[]"]
)
def test_a_garbled_stored_target_is_ignored(raw: str) -> None:
    from maverick_serve.autoscaling.learned_store import MemoryTargetStore

    store = MemoryTargetStore()
    store.values["maverick/engine"] = raw
    assert store.load("maverick/engine", {}) is None
    store.save("maverick/engine", 6.0, {})
    assert store.load("maverick/engine", {}) == 6.0


def test_outside_ray_the_kv_store_keeps_nothing_and_never_raises() -> None:
    import ray

    from maverick_serve.autoscaling.learned_store import RayKvTargetStore

    assert not ray.is_initialized()
    store = RayKvTargetStore()
    store.save("maverick/engine", 6.0, {})
    assert store.load("maverick/engine", {}) is None
