"""What one replica can carry, learned from the latencies it gives at the load it has.

`target_per_replica` from config is a guess the operator has to make per model, GPU and prompt
mix; a wrong one either breaks the SLO (too high) or pays for idle replicas (too low). The
learner moves it against the tier's latency SLO, in the way Dynamo's planner corrects its
profiled per-GPU capacity by observed TTFT/ITL and AIBrix rate-limits its changes:
- shrink by `shrink` (multiplicative, fast) when a p95 went above its SLO while the replicas
  carried no more than the target load (up band included): the SLO broke at that load, so one
  replica carries less (a breach above it is a scale-up still under way, not a wrong target);
- grow by `grow` (multiplicative, slower) when every p95 stayed under `headroom` x its SLO while
  the replicas carried at least the target load less the down band: they carry it with room
  to spare;
- learn nothing otherwise: good latency at a light load says nothing about capacity, and stale,
  missing or zero-replica signals say nothing at all.
One judgement per `interval_s`, on the worst p95 / SLO seen since the last one and the mean load
per replica over the interval; for half an interval after a change, latencies are not judged
(the replicas' latency window still holds ones from under the old target).
"""

from __future__ import annotations

import math
from collections import deque

from maverick_serve.autoscaling.signals import TierSignals
from maverick_serve.config.autoscaling import TierScalingConfig


class CapacityLearner:
    """Owns the tier's current `target` (load per replica). Called by `LoadTargetPolicy` with
    every fresh signal, in the same process (Serve's controller); pure state, no I/O."""

    def __init__(self, cfg: TierScalingConfig) -> None:
        self.cfg = cfg
        self.learn = cfg.learn_capacity
        self.target = cfg.target_per_replica
        self.per_replica: deque[tuple[float, float]] = deque()
        self.worst: float | None = None  # the worst settled p95 / SLO since the last judgement
        self.last_change = -math.inf  # when the target last moved
        self.last_judgement: float | None = None  # None: no signal yet
        self.judged: tuple[float, float] | None = None  # (worst p95 / SLO, mean load) last judged

    def resume(self, target: float) -> float:
        """Start from a target learned before (a restarted controller), within the bounds; returns
        the target now held."""
        if self.learn.enabled:
            self.target = min(self.learn.max_target, max(self.learn.min_target, target))
        return self.target

    def _slo_ratio(self, s: TierSignals) -> float | None:
        """The worst p95 / SLO over the SLOs that are set and reported (None: nothing to judge)."""
        ratios = [
            p95 / slo
            for p95, slo in ((s.ttft_p95_s, self.cfg.slo_ttft_p95_s), (s.itl_p95_s, self.cfg.slo_itl_p95_s))
            if slo is not None and p95 is not None
        ]
        return max(ratios) if ratios else None

    def observe(self, s: TierSignals) -> str | None:
        """Record one fresh signal; returns "learn:shrink" or "learn:grow" when the target moved."""
        # The replicas running, not Serve's target: while added ones start (minutes for a GPU
        # node) the running ones carry the load, and a breach then is theirs.
        replicas = s.replicas if s.running is None else s.running
        if not self.learn.enabled or s.load is None or replicas <= 0:
            return None
        if self.last_judgement is None:
            self.last_judgement = s.now
        self.per_replica.append((s.now, s.load / replicas))
        while self.per_replica and s.now - self.per_replica[0][0] > self.learn.interval_s:
            self.per_replica.popleft()
        # For half an interval after a change the replicas' latency window (at most half an
        # interval, checked by the config) still holds latencies from under the old target.
        settled = s.now - self.last_change >= self.learn.interval_s / 2
        if settled and (ratio := self._slo_ratio(s)) is not None:
            self.worst = ratio if self.worst is None else max(self.worst, ratio)
        if s.now - self.last_judgement < self.learn.interval_s:
            return None
        # One judgement per interval, with or without latencies to judge (a first reading after
        # an idle spell waits for the next boundary instead of being judged alone at once).
        worst, self.worst, self.last_judgement = self.worst, None, s.now
        if worst is None:
            return None
        mean = sum(load for _, load in self.per_replica) / len(self.per_replica)
        self.judged = (worst, mean)
        before = self.target
        # A breach while the replicas carried more than the target (past the up band) is a
        # scale-up still under way, not a wrong target. The step is bounded, so one breach at a
        # light load (a cold replica, one long prompt) costs `shrink` of the target, not all of it.
        if worst > 1.0 and mean <= before * (1 + self.cfg.up_band):
            self.target = max(self.learn.min_target, before * (1 - self.learn.shrink))
        elif worst < self.learn.headroom and mean >= before * (1 - self.cfg.down_band):
            self.target = min(self.learn.max_target, before * (1 + self.learn.grow))
        if self.target == before:
            return None
        self.last_change = s.now
        return "learn:shrink" if self.target < before else "learn:grow"
