"""Dispatch/combine: move one MoE layer's tokens to the workers holding their experts and back.

`ExpertTransport` is the seam. Implementations:
- `RayActorTransport` (CPU and any Ray cluster): one actor call per worker per layer carrying a
  numpy array (read zero-copy from Ray's object store on the same node);
- `TorchDistributedTransport` (GPU nodes, `transport.type: nccl`): all-to-all over NCCL between
  the engine rank and expert ranks, see `nccl_transport.py`.
"""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maverick_serve.experts.placement import ExpertPlacement

logger = logging.getLogger(__name__)


class ExpertWorkerDied(RuntimeError):
    def __init__(self, worker: int, cause: BaseException) -> None:
        super().__init__(f"expert worker {worker} died: {cause!r}")
        self.worker = worker


@dataclass
class TransportStats:
    calls: int = 0
    tokens: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0  # wall time inside dispatch/combine, compute on workers included
    retries: int = 0


class ExpertTransport(ABC):
    """Contract:
    - `run_layer(layer, tokens, expert_ids)` is called by the engine's forward pass, once per MoE
      layer per step, synchronously, from one thread. `tokens` [N, hidden] are router-scaled,
      `expert_ids` [N]. It returns [N, hidden] in the same row order, on the tokens' device/dtype.
    - Each row's result depends only on that row and its expert, so the answer is identical for
      any placement, replica choice or retry.
    - A worker that dies mid-call raises `ExpertWorkerDied`; the caller (the tier) fails over and
      calls again with the new placement.
    - `set_placement` is only called between engine steps.
    """

    stats: TransportStats

    @abstractmethod
    def run_layer(self, layer: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def set_placement(self, placement: ExpertPlacement) -> None: ...


def route_rows(placement: ExpertPlacement, layer: int, expert_ids: np.ndarray) -> np.ndarray:
    """Worker of each row: an expert with r replicas spreads its rows round-robin over them."""
    row = placement.replicas[layer]
    workers = np.empty(len(expert_ids), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, e in enumerate(expert_ids.tolist()):
        replicas = row[e]
        k = seen.get(e, 0)
        workers[i] = replicas[k % len(replicas)]
        seen[e] = k + 1
    return workers


class RayActorTransport(ExpertTransport):
    def __init__(
        self,
        workers: list[Any],
        placement: ExpertPlacement,
        get: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        import ray

        self.workers = workers
        self.placement = placement
        self._get = get or ray.get
        self._actor_error: tuple[type[BaseException], ...] = (ray.exceptions.RayActorError,)
        self.stats = TransportStats()

    def set_placement(self, placement: ExpertPlacement) -> None:
        self.placement = placement

    def run_layer(self, layer: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.empty_like(tokens)
        if tokens.shape[0] == 0:
            return out
        ids = expert_ids.cpu().numpy()
        x = tokens.detach().float().cpu().numpy()
        dest = route_rows(self.placement, layer, ids)
        calls: list[tuple[int, np.ndarray, Any]] = []
        for w in np.unique(dest).tolist():
            rows = np.nonzero(dest == w)[0]
            calls.append((w, rows, self.workers[w].run.remote(layer, x[rows], ids[rows])))
        try:
            results = self._get([ref for _, _, ref in calls])
        except self._actor_error as exc:
            dead = self._find_dead([w for w, _, _ in calls])
            raise ExpertWorkerDied(dead, exc) from exc
        with warnings.catch_warnings():  # results are read-only zero-copy views; we only read them
            warnings.simplefilter("ignore", UserWarning)
            for (_, rows, _), result in zip(calls, results, strict=True):
                out[torch.from_numpy(rows).to(out.device)] = torch.from_numpy(result).to(
                    out.device, out.dtype
                )
        self.stats.calls += len(calls)
        self.stats.tokens += len(ids)
        self.stats.bytes_moved += 2 * x.nbytes  # hidden states out and back
        self.stats.seconds += time.perf_counter() - start
        return out

    def _find_dead(self, candidates: list[int]) -> int:
        for w in candidates:
            try:
                self._get([self.workers[w].ping.remote()])
            except self._actor_error:
                return w
        return candidates[0]
