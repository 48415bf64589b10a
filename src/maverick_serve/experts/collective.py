"""Dispatch/combine as all-to-all collectives (torch.distributed): NCCL between GPUs, gloo on CPU.

Ranks: the engine is rank 0, expert worker w is rank w + 1. For every MoE layer the engine drives
three exchanges that every rank joins:
  1. header  [world, 2] int64: (layer, rows for that rank)   — layer -1 tells workers to stop;
  2. tokens  [rows, hidden] and expert ids [rows], split by destination rank;
  3. outputs back to rank 0, which restores the original row order.
With NCCL this is the DeepEP-style dispatch/combine pattern on NVLink / RDMA; with gloo the same
code runs on CPU, which is how it is tested on machines without GPUs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from maverick_serve.experts.placement import ExpertPlacement
from maverick_serve.experts.transport import ExpertTransport, TransportStats, route_rows

STOP = -1


def _exchange_header(world: int, rows_per_rank: list[int], layer: int, device: torch.device) -> torch.Tensor:
    send = torch.zeros(world, 2, dtype=torch.long, device=device)
    send[:, 0] = layer
    send[:, 1] = torch.tensor(rows_per_rank, dtype=torch.long)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv


class CollectiveTransport(ExpertTransport):
    """Engine side (rank 0). `init_process_group` must already have run on every rank."""

    def __init__(self, placement: ExpertPlacement, hidden: int, device: torch.device) -> None:
        self.placement = placement
        self.hidden = hidden
        self.device = device
        self.world = placement.num_workers + 1
        self.stats = TransportStats()

    def set_placement(self, placement: ExpertPlacement) -> None:
        self.placement = placement

    def run_layer(self, layer: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        ids_np = expert_ids.cpu().numpy()
        dest = route_rows(self.placement, layer, ids_np) + 1  # worker w is rank w + 1
        order = torch.from_numpy(np.argsort(dest, kind="stable")).to(self.device)
        counts = [int((dest == r).sum()) for r in range(self.world)]
        _exchange_header(self.world, counts, layer, self.device)
        x = tokens.to(self.device)[order].float().contiguous()
        ids = expert_ids.to(self.device)[order].long().contiguous()
        zeros = [0] * self.world
        dist.all_to_all_single(torch.empty(0, self.hidden, device=self.device), x, zeros, counts)
        dist.all_to_all_single(torch.empty(0, dtype=torch.long, device=self.device), ids, zeros, counts)
        back = torch.empty(len(ids_np), self.hidden, device=self.device)
        dist.all_to_all_single(back, torch.empty(0, self.hidden, device=self.device), counts, zeros)
        out = torch.empty_like(back)
        out[order] = back
        self.stats.calls += 1
        self.stats.tokens += len(ids_np)
        self.stats.bytes_moved += 2 * x.numel() * x.element_size()
        self.stats.seconds += time.perf_counter() - start
        return out.to(tokens.device, tokens.dtype)

    def stop_workers(self) -> None:
        _exchange_header(self.world, [0] * self.world, STOP, self.device)


def serve_collective(run: Any, rank: int, world: int, hidden: int, device: torch.device) -> int:
    """Worker side: answer layer exchanges until the engine sends STOP. `run(layer, x, ids)` runs
    this worker's experts. Returns the number of layers served."""
    served = 0
    while True:
        header = _exchange_header(world, [0] * world, 0, device)  # workers send nothing in the header
        layer, rows = int(header[0, 0]), int(header[0, 1])
        if layer == STOP:
            return served
        recv_splits = [rows] + [0] * (world - 1)
        zeros = [0] * world
        x = torch.empty(rows, hidden, device=device)
        dist.all_to_all_single(x, torch.empty(0, hidden, device=device), recv_splits, zeros)
        ids = torch.empty(rows, dtype=torch.long, device=device)
        dist.all_to_all_single(ids, torch.empty(0, dtype=torch.long, device=device), recv_splits, zeros)
        out = run(layer, x, ids).float().contiguous() if rows else torch.empty(0, hidden, device=device)
        dist.all_to_all_single(torch.empty(0, hidden, device=device), out, zeros, recv_splits)
        served += 1
