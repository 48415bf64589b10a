"""An expert worker: holds some routed experts of some MoE layers and runs them on request.

A plain class; the expert tier turns it into a Ray actor (one per GPU on GPU nodes, several per
CPU node here). Messages are plain arrays and ints: tokens [n, hidden] and expert ids [n] in,
outputs [n, hidden] out, in the same row order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from maverick_serve.config.model import ModelSpec
from maverick_serve.experts.weights import ExpertWeightReader
from maverick_serve.model.checkpoint import torch_dtype
from maverick_serve.model.moe import grouped_expert_forward


class _LayerShard:
    """Held experts of one layer, stacked so tokens run as grouped matmuls."""

    def __init__(self) -> None:
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gate_up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None
        self.local_index = torch.empty(0, dtype=torch.long)

    def rebuild(self, num_experts: int) -> None:
        ids = sorted(self.weights)
        self.local_index = torch.full((num_experts,), -1, dtype=torch.long)
        if not ids:
            self.gate_up = self.down = None
            return
        self.local_index[torch.tensor(ids)] = torch.arange(len(ids))
        self.gate_up = torch.stack([self.weights[e][0] for e in ids])
        self.down = torch.stack([self.weights[e][1] for e in ids])


class ExpertWorker:
    def __init__(
        self,
        model_dir: str,
        worker_id: int,
        dtype: str = "float32",
        device: str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.worker_id = worker_id
        self.spec = ModelSpec.from_pretrained_dir(Path(model_dir))
        self.reader = ExpertWeightReader(Path(model_dir), self.spec)
        self.dtype = torch_dtype(dtype)
        self.device = torch.device(device)
        self.shards: dict[int, _LayerShard] = {layer: _LayerShard() for layer in self.spec.text.moe_layers}
        self.tokens_served = 0
        self.compute_seconds = 0.0

    def load(self, assignments: dict[int, list[int]]) -> int:
        """Make sure every assigned expert is held (loading is done before any switch). Returns
        how many experts were newly loaded. Experts already held stay (see `prune`)."""
        loaded = 0
        for layer, experts in assignments.items():
            shard = self.shards[int(layer)]
            new = [e for e in experts if e not in shard.weights]
            for e in new:
                gate_up, down = self.reader.read(int(layer), e, self.dtype)
                shard.weights[e] = (gate_up.to(self.device), down.to(self.device))
            if new:
                shard.rebuild(self.spec.text.num_local_experts)
                loaded += len(new)
        return loaded

    def prune(self, assignments: dict[int, list[int]]) -> int:
        """Drop experts not in `assignments` (once no engine routes to them any more)."""
        dropped = 0
        for layer, shard in self.shards.items():
            keep = set(assignments.get(layer, []))
            gone = [e for e in shard.weights if e not in keep]
            for e in gone:
                del shard.weights[e]
            if gone:
                shard.rebuild(self.spec.text.num_local_experts)
                dropped += len(gone)
        return dropped

    def held(self) -> dict[int, list[int]]:
        return {layer: sorted(shard.weights) for layer, shard in self.shards.items()}

    def run(self, layer: int, tokens: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
        shard = self.shards[layer]
        ids = torch.from_numpy(np.asarray(expert_ids, dtype=np.int64))
        local = shard.local_index[ids] if len(ids) else ids
        if (local < 0).any():
            missing = sorted(set(ids[local < 0].tolist()))
            raise KeyError(f"expert worker {self.worker_id} does not hold experts {missing} of layer {layer}")
        assert shard.gate_up is not None and shard.down is not None
        start = time.perf_counter()
        x = torch.from_numpy(np.asarray(tokens)).to(self.device, self.dtype)
        with torch.inference_mode():
            out = grouped_expert_forward(x, local.to(self.device), shard.gate_up, shard.down)
        self.tokens_served += len(ids)
        self.compute_seconds += time.perf_counter() - start
        # The wire format is fp32 numpy (numpy has no bf16); the engine casts back.
        return out.float().cpu().numpy()

    def run_tensor(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Collective path: tensors already on this worker's device."""
        shard = self.shards[layer]
        local = shard.local_index.to(expert_ids.device)[expert_ids]
        if (local < 0).any():
            raise KeyError(f"expert worker {self.worker_id} does not hold some experts of layer {layer}")
        assert shard.gate_up is not None and shard.down is not None
        with torch.inference_mode():
            return grouped_expert_forward(x.to(self.dtype), local, shard.gate_up, shard.down)

    def serve_collective(
        self, init_method: str, rank: int, world: int, backend: str, timeout_s: float
    ) -> int:
        """Join the engine's process group and answer all-to-all exchanges until told to stop."""
        import datetime

        import torch.distributed as dist

        from maverick_serve.experts.collective import serve_collective

        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            return serve_collective(self.run_tensor, rank, world, self.spec.text.hidden_size, self.device)
        finally:
            dist.destroy_process_group()

    def run_packed(self, payload: tuple[int, np.ndarray, np.ndarray] | None) -> np.ndarray | None:
        """Compiled-graph entry: every worker is called each layer; idle ones get None."""
        return None if payload is None else self.run(*payload)

    def ping(self) -> dict[str, float]:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "tokens_served": self.tokens_served,
            "compute_seconds": self.compute_seconds,
        }
