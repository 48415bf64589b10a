"""The `AutoscalingPolicy` seam and the load-target policy every tier uses.

Contract: `decide(signals)` is called by Serve's controller (one process) on every autoscaling
tick with the tier's newest signals and returns the replica count it wants with the reason. It
is a function of its inputs and of the state on the instance (windows, the times of the last
changes); it never raises on missing or stale data: it holds. Serve's own delays must be 0 so
the hysteresis here is the only one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

from maverick_serve.autoscaling.capacity import CapacityLearner
from maverick_serve.autoscaling.signals import TierSignals
from maverick_serve.config.autoscaling import TierScalingConfig

__all__ = ["AutoscalingPolicy", "Decision", "LoadTargetPolicy", "TierSignals"]


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str  # hold:stale|band|cooldown | up:load|panic|peak|slo|kv | down:load | clamp | budget


class AutoscalingPolicy(ABC):
    @abstractmethod
    def decide(self, signals: TierSignals) -> Decision: ...


class LoadTargetPolicy(AutoscalingPolicy):
    """desired = ceil(load / target): up on the higher of a stable and a short window, down on
    the stable window and never below what the window's peak needs; a panic window for bursts
    (past the up cooldown), dead bands, cooldowns, step limits, SLO guards, and a hold on stale
    signals. `target` is `target_per_replica`, or what `learn_capacity` has learned from it."""

    def __init__(self, cfg: TierScalingConfig) -> None:
        self.cfg = cfg
        self.capacity = CapacityLearner(cfg)
        self.samples: deque[tuple[float, float]] = deque()
        self.last_up = -math.inf
        self.last_change = -math.inf

    @property
    def target(self) -> float:
        """The load one replica should carry now (config, or learned)."""
        return self.capacity.target

    def _mean(self, now: float, window_s: float) -> float:
        values = [load for t, load in self.samples if now - t <= window_s]
        return sum(values) / len(values) if values else 0.0

    def _clamp(self, n: int) -> int:
        return max(self.cfg.min_replicas, min(self.cfg.max_replicas, n))

    def decide(self, s: TierSignals) -> Decision:
        c = self.cfg
        current = s.replicas
        if s.load is None or s.age_s > c.stale_after_s:
            held = self._clamp(current)
            return Decision(held, "hold:stale" if held == current else "clamp")
        self.samples.append((s.now, s.load))
        while self.samples and s.now - self.samples[0][0] > c.stable_window_s:
            self.samples.popleft()
        self.capacity.observe(s)
        target = self.capacity.target
        stable, burst = self._mean(s.now, c.stable_window_s), self._mean(s.now, c.panic_window_s)
        capacity = max(current, 1) * target
        want, reason = current, "hold:band"
        if burst > c.panic_factor * capacity:
            want, reason = max(current + 1, math.ceil(burst / target)), "up:panic"
        elif (high := max(stable, burst)) > current * target * (1 + c.up_band) or (current == 0 and high > 0):
            # Up fast (the short window when it is higher), down slow (the stable window only).
            want, reason = math.ceil(high / target), "up:load"
        elif (c.slo_ttft_p95_s and (s.ttft_p95_s or 0) > c.slo_ttft_p95_s) or (
            c.slo_itl_p95_s and (s.itl_p95_s or 0) > c.slo_itl_p95_s
        ):
            want, reason = current + 1, "up:slo"
        elif c.kv_usage_high and (s.kv_usage or 0) > c.kv_usage_high and s.waiting > 0:
            want, reason = current + 1, "up:kv"  # the KV cache, not the request count, is full
        elif current > 0 and stable < current * target * (1 - c.down_band):
            # Never down to a count the window's peak would push straight back up (no flapping).
            peak = max(load for _, load in self.samples)
            floor = math.ceil(peak / (target * (1 + c.up_band)))
            want = max(math.ceil(stable / target), floor)
            reason = "down:load" if want < current else "up:peak"
        if want > current:
            if reason != "up:panic" and s.now - self.last_up < c.upscale_cooldown_s:
                return Decision(self._clamp(current), "hold:cooldown")
            want = min(want, current + c.max_step_up)
        elif want < current:
            if s.now - self.last_change < c.downscale_cooldown_s:
                return Decision(self._clamp(current), "hold:cooldown")
            want = max(want, current - c.max_step_down)
        final = self._clamp(want)
        if final > current:
            self.last_up = self.last_change = s.now
        elif final < current:
            self.last_change = s.now
        if final != want:
            reason = "clamp"
        elif final == current and not reason.startswith("hold"):
            reason = "hold:band"  # the rule fired but the count it asks for is the current one
        return Decision(final, reason)
