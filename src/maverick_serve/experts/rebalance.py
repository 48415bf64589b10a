"""Load-driven placement (the idea behind DeepSeek's EPLB): replicate the hottest experts into the
spare slots, then pack replicas onto workers heaviest-first onto the least-loaded worker."""

from __future__ import annotations

from maverick_serve.experts.placement import ExpertPlacement, PlacementError


def balance_layer(loads: list[float], num_workers: int, slots_per_worker: int) -> tuple[tuple[int, ...], ...]:
    num_experts = len(loads)
    if num_workers * slots_per_worker < num_experts:
        raise PlacementError(
            f"{num_workers} workers × {slots_per_worker} slots cannot hold {num_experts} experts"
        )
    copies = [1] * num_experts
    spare = min(num_workers * slots_per_worker - num_experts, num_experts * (num_workers - 1))
    for _ in range(spare):
        # The expert whose per-replica load is largest gets one more replica (ties: lowest id).
        best = max(
            range(num_experts), key=lambda e: (loads[e] / copies[e] if copies[e] < num_workers else -1, -e)
        )
        if copies[best] >= num_workers:
            break
        copies[best] += 1
    items = sorted(
        ((loads[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
        key=lambda it: (-it[0], it[1]),
    )
    worker_load = [0.0] * num_workers
    held: list[set[int]] = [set() for _ in range(num_workers)]
    for load, e in items:
        candidates = [w for w in range(num_workers) if len(held[w]) < slots_per_worker and e not in held[w]]
        if not candidates:
            continue  # no room for this extra copy; the expert keeps its other replicas
        w = min(candidates, key=lambda w: (worker_load[w], len(held[w]), w))
        held[w].add(e)
        worker_load[w] += load
    rows = tuple(tuple(sorted(w for w in range(num_workers) if e in held[w])) for e in range(num_experts))
    if any(not r for r in rows):
        raise PlacementError("rebalancing left an expert without a worker")
    return rows


def rebalanced(
    placement: ExpertPlacement, loads: dict[int, list[float]], slots_per_worker: int
) -> ExpertPlacement:
    return placement.with_replicas(
        {
            layer: balance_layer(loads[layer], placement.num_workers, slots_per_worker)
            for layer in placement.moe_layers
        }
    )
