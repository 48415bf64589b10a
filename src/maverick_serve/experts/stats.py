"""Expert load statistics: tokens per expert per MoE layer over a sliding window of steps."""

from __future__ import annotations

from collections import deque

import torch

from maverick_serve.experts.placement import ExpertPlacement


class ExpertLoadTracker:
    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, window_steps: int) -> None:
        self.moe_layers = moe_layers
        self.num_experts = num_experts
        self.window: deque[dict[int, torch.Tensor]] = deque(maxlen=window_steps)
        self._current: dict[int, torch.Tensor] = {}

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        counts = torch.bincount(expert_ids.reshape(-1).cpu(), minlength=self.num_experts)
        prev = self._current.get(layer)
        self._current[layer] = counts if prev is None else prev + counts

    def end_step(self) -> None:
        if self._current:
            self.window.append(self._current)
            self._current = {}

    def loads(self) -> dict[int, list[float]]:
        """layer → tokens per expert over the window."""
        total = {layer: torch.zeros(self.num_experts, dtype=torch.long) for layer in self.moe_layers}
        for step in self.window:
            for layer, counts in step.items():
                total[layer] += counts
        return {layer: [float(v) for v in counts.tolist()] for layer, counts in total.items()}

    def imbalance(self, placement: ExpertPlacement) -> float:
        """Mean over layers of max/mean worker load (1.0 = perfectly even). A replicated expert's
        tokens are split evenly between its replicas, as the transport sends them."""
        loads = self.loads()
        ratios = []
        for layer in self.moe_layers:
            per_worker = [0.0] * placement.num_workers
            for e, workers in enumerate(placement.replicas[layer]):
                for w in workers:
                    per_worker[w] += loads[layer][e] / len(workers)
            mean = sum(per_worker) / len(per_worker)
            if mean > 0:
                ratios.append(max(per_worker) / mean)
        return sum(ratios) / len(ratios) if ratios else 1.0
