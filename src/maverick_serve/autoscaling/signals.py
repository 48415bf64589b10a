"""What a tier's policy sees on one tick (built from Serve's AutoscalingContext by serve_policy)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TierSignals:
    now: float
    replicas: int  # Serve's target count
    load: float | None  # None: no replica reported
    age_s: float = 0.0  # age of the newest report
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None
    kv_usage: float | None = None  # mean KV-cache usage of the tier's replicas (engine)
    waiting: float = 0.0  # requests queued for admission (engine)
    running: int | None = None  # replicas running now (None: unknown, take `replicas`)
