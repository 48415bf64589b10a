"""Dispatch/combine: move one MoE layer's tokens to the workers holding their experts and back.

`ExpertTransport` is the seam. Implementations:
- `RayActorTransport` (CPU and any Ray cluster): one actor call per worker per layer carrying a
  numpy array (read zero-copy from Ray's object store on the same node);
- `TorchDistributedTransport` (GPU nodes, `transport.type: nccl`): all-to-all over NCCL between
  the engine rank and expert ranks, see `nccl_transport.py`.
"""

from __future__ import annotations

import contextlib
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

    def drop_worker(self, worker: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """Forget a dead worker (called on failover, before the new placement is set)."""

    def add_worker(self, worker: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """A replacement took a dead worker's index (called before the placement that uses it)."""


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
        rows_of, results = self._exchange(layer, x, ids, route_rows(self.placement, layer, ids))
        with warnings.catch_warnings():  # results are read-only zero-copy views; we only read them
            warnings.simplefilter("ignore", UserWarning)
            for rows, result in zip(rows_of, results, strict=True):
                if result is not None:
                    out[torch.from_numpy(rows).to(out.device)] = torch.from_numpy(result).to(
                        out.device, out.dtype
                    )
        self.stats.calls += sum(r is not None for r in results)
        self.stats.tokens += len(ids)
        self.stats.bytes_moved += 2 * x.nbytes  # hidden states out and back
        self.stats.seconds += time.perf_counter() - start
        return out

    def _exchange(
        self, layer: int, x: np.ndarray, ids: np.ndarray, dest: np.ndarray
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Send each worker its rows; return (rows per call, result per call)."""
        calls: list[tuple[int, np.ndarray, Any]] = []
        for w in np.unique(dest).tolist():
            rows = np.nonzero(dest == w)[0]
            calls.append((w, rows, self.workers[w].run.remote(layer, x[rows], ids[rows])))
        try:
            results = self._get([ref for _, _, ref in calls])
        except self._actor_error as exc:
            dead = self._find_dead([w for w, _, _ in calls])
            raise ExpertWorkerDied(dead, exc) from exc
        return [rows for _, rows, _ in calls], results

    def _find_dead(self, candidates: list[int]) -> int:
        for w in candidates:
            try:
                self._get([self.workers[w].ping.remote()])
            except self._actor_error:
                return w
        return candidates[0]


class RayCompiledTransport(RayActorTransport):
    """The same dispatch/combine through a Ray compiled graph: one static graph calls every live
    worker per MoE layer over shared-memory channels, ~4× less per-call overhead than actor calls
    here. A compiled graph binds its actors, so one engine owns the tier (engine replicas = 1)."""

    def __init__(self, workers: list[Any], placement: ExpertPlacement) -> None:
        super().__init__(workers, placement)
        import ray

        self._channel_error: tuple[type[BaseException], ...] = (
            ray.exceptions.RayChannelError,
            ray.exceptions.RayActorError,
        )
        self.live = list(range(len(workers)))
        self._graph: Any = None

    def _compiled(self) -> Any:
        if self._graph is None:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as inp:
                dag = MultiOutputNode(
                    [self.workers[w].run_packed.bind(inp[i]) for i, w in enumerate(self.live)]
                )
            self._graph = dag.experimental_compile()
        return self._graph

    def drop_worker(self, worker: int) -> None:
        if worker in self.live:
            self.live.remove(worker)
        self.close()

    def add_worker(self, worker: int) -> None:
        if worker not in self.live:
            self.live = sorted([*self.live, worker])
        self.close()  # the graph binds its actors: compile it again with the new one

    def close(self) -> None:
        if self._graph is not None:
            with contextlib.suppress(Exception):
                self._graph.teardown()
            self._graph = None

    def _exchange(
        self, layer: int, x: np.ndarray, ids: np.ndarray, dest: np.ndarray
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        payloads: list[tuple[int, np.ndarray, np.ndarray] | None] = []
        rows_of: list[np.ndarray] = []
        for w in self.live:
            rows = np.nonzero(dest == w)[0]
            rows_of.append(rows)
            payloads.append((layer, x[rows], ids[rows]) if len(rows) else None)
        try:
            results: list[np.ndarray | None] = self._get(self._compiled().execute(*payloads))
        except self._channel_error as exc:
            self.close()
            dead = self._find_dead(list(self.live))
            raise ExpertWorkerDied(dead, exc) from exc
        return rows_of, results
