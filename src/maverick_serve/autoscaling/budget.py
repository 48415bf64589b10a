"""Across tiers: expert workers follow the engines, and all tiers share one GPU budget."""

from __future__ import annotations

import math


def experts_for_engines(engines: int, workers_per_engine: float, ep_group: int, lo: int, hi: int) -> int:
    """Expert workers for `engines` engine replicas, in whole EP groups, within [lo, hi]."""
    groups = math.ceil(engines * workers_per_engine / ep_group)
    return max(lo, min(hi, groups * ep_group))


def fit_gpu_budget(
    desired: dict[str, int],
    gpus_each: dict[str, float],
    minimum: dict[str, int],
    budget: float,
    give_up_first: tuple[str, ...] = ("prefill", "engine", "experts"),
) -> dict[str, int]:
    """Lower tiers (in `give_up_first` order, one replica at a time) until their GPUs fit the
    budget; never below a tier's minimum. Raises when the minimums alone do not fit."""
    floor = sum(minimum.get(t, 0) * gpus_each.get(t, 0.0) for t in desired)
    if floor > budget:
        raise ValueError(f"the tiers' minimum replicas need {floor:g} GPUs, above the budget of {budget:g}")
    out = dict(desired)

    def used() -> float:
        return sum(n * gpus_each.get(t, 0.0) for t, n in out.items())

    while used() > budget:
        for tier in give_up_first:
            if tier in out and out[tier] > minimum.get(tier, 0) and gpus_each.get(tier, 0.0) > 0:
                out[tier] -= 1
                break
        else:  # only tiers without GPUs or at their minimum are left
            break
    return out
