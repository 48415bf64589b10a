"""One GPU budget across tiers: lower the tiers' wishes until their GPUs fit."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fit_gpu_budget(
    desired: dict[str, int],
    current: dict[str, int],
    costs: dict[str, float],
    minimum: dict[str, int],
    budget: float | None,
    give_up_first: Sequence[str] = ("prefill", "engine", "router"),
    group_costs: dict[str, tuple[int, float]] | None = None,
) -> dict[str, int]:
    """The counts to ask for: every tier keeps what it holds or goes where it wants to go down to;
    the budget left is then handed, one replica at a time and round robin, to the tiers that want
    more, most important first (the reverse of `give_up_first`). A tier never takes replicas from
    another to grow (that would make two tiers fight). Only when what the tiers hold already
    exceeds the budget (it was lowered) are replicas taken back, in `give_up_first` order, never
    below a tier's minimum. `group_costs[tier] = (per, cost)`: what follows the tier's count in
    whole groups (expert workers following engines), ceil(n / per) x cost on top of n x costs."""
    if budget is None:
        return dict(desired)
    limit = budget + 1e-9
    out = {t: max(minimum.get(t, 0), min(n, current.get(t, n))) for t, n in desired.items()}

    groups = group_costs or {}

    def used(extra: str | None = None) -> float:
        total = 0.0
        for t, n in out.items():
            n += t == extra
            per, group = groups.get(t, (1, 0.0))
            total += n * costs.get(t, 0.0) + math.ceil(n / per) * group
        return total

    def costly(t: str) -> bool:
        return bool(costs.get(t) or groups.get(t, (1, 0.0))[1])

    while used() > limit:
        shrinkable = [t for t in give_up_first if t in out and out[t] > minimum.get(t, 0) and costly(t)]
        if not shrinkable:
            break  # the minimums alone exceed the budget: the config validator refuses that
        out[shrinkable[0]] -= 1
    priority = [t for t in reversed(give_up_first) if t in out] + [t for t in out if t not in give_up_first]
    grew = True
    while grew:
        grew = False
        for tier in priority:
            if out[tier] < desired[tier] and used(extra=tier) <= limit:
                out[tier] += 1
                grew = True
    return out
