"""Llama 4 MoE feed-forward: top-k sigmoid router, shared expert, routed experts behind a seam.

The routed experts are reached through `ExpertExecutor` so the expert-parallel tier can move
them off the engine replica (to other GPUs or hosts) without touching the model code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from maverick_serve.config.model import TextSpec
from maverick_serve.model.cpu_gemm import PackedGemm
from maverick_serve.model.layers import FeedForward


class ExpertExecutor(ABC):
    """Runs the routed experts of one MoE layer.

    Contract:
    - `run_experts(tokens, expert_ids)` is called once per MoE layer per forward step, from the
      engine's forward pass, synchronously; it may block on remote workers.
    - `tokens` [N, hidden] are already scaled by their router weight; `expert_ids` [N] are in
      [0, num_experts). The result is [N, hidden] in the same row order, on `tokens`' device and
      dtype. N may be 0.
    - The result for a row depends only on that row and its expert (no cross-row effects), so
      outputs are identical however tokens are batched or sharded.
    """

    @abstractmethod
    def run_experts(self, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor: ...


class LocalExperts(nn.Module, ExpertExecutor):
    """All routed experts of a layer in this process, in the fused Hugging Face layout.

    gate_up_proj: [E, hidden, 2 * inter]; down_proj: [E, inter, hidden]. Tokens are grouped by
    expert and each group runs as one matmul (a grouped GEMM done as a loop over non-empty groups).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, hidden, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, intermediate, hidden))
        self.packed: list[tuple[PackedGemm, PackedGemm]] | None = None  # set by pack_cpu_gemms

    def pack_cpu_gemms(self) -> None:
        """One (gate_up, down) pair per expert, in nn.Linear layout ([out, in])."""
        self.packed = [
            (PackedGemm([self.gate_up_proj[e].t()]), PackedGemm([self.down_proj[e].t()]))
            for e in range(self.num_experts)
        ]

    def run_experts(self, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_expert_forward(tokens, expert_ids, self.packed)
        return grouped_expert_forward(tokens, expert_ids, self.gate_up_proj, self.down_proj)


def _per_expert(
    tokens: torch.Tensor, expert_ids: torch.Tensor, swiglu: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Rows grouped by expert id, `swiglu(expert, rows)` once per expert that has rows, results
    back in the rows' order. Per-op work counts here: a decode step of 16 tokens meets every
    expert of every MoE layer with one or two rows each, so the groups' results go out with one
    `index_copy_` instead of one scatter per expert."""
    if tokens.shape[0] == 0:
        return torch.empty_like(tokens)
    order = torch.argsort(expert_ids, stable=True)
    sorted_tokens = tokens.index_select(0, order)
    outs = []
    start = 0
    for expert, count in enumerate(torch.bincount(expert_ids).tolist()):
        if count:
            outs.append(swiglu(expert, sorted_tokens[start : start + count]))
            start += count
    sorted_out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return torch.empty_like(tokens).index_copy_(0, order, sorted_out)


def grouped_expert_forward(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert. `expert_offset` maps global ids to local rows."""

    def swiglu(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ gate_up_proj[expert - expert_offset]).chunk(2, dim=-1)
        return (up * nn.functional.silu(gate)) @ down_proj[expert - expert_offset]

    return _per_expert(tokens, expert_ids, swiglu)


def packed_expert_forward(
    tokens: torch.Tensor, expert_ids: torch.Tensor, packed: list[tuple[PackedGemm, PackedGemm]]
) -> torch.Tensor:
    """`grouped_expert_forward` over per-expert packed oneDNN weights (see `cpu_gemm`); SwiGLU in
    place on the gate GEMM's fresh output."""

    def swiglu(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up, down = packed[expert]
        gate, up = gate_up(rows).chunk(2, dim=-1)
        return down(nn.functional.silu(gate).mul_(up))

    return _per_expert(tokens, expert_ids, swiglu)


class Router(nn.Module):
    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.num_local_experts, spec.hidden_size))
        self.top_k = spec.num_experts_per_tok
        self.gemm: PackedGemm | None = None  # set by pack_cpu_gemms

    def pack_cpu_gemms(self) -> None:
        self.gemm = PackedGemm([self.weight])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scores [N, k] = sigmoid of the chosen logits, expert ids [N, k])."""
        logits = self.gemm(x) if self.gemm is not None else nn.functional.linear(x, self.weight)
        top_values, top_ids = torch.topk(logits, self.top_k, dim=1)
        return torch.sigmoid(top_values.float()).to(x.dtype), top_ids


class MoEFeedForward(nn.Module):
    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.router = Router(spec)
        self.shared_expert = FeedForward(spec.hidden_size, spec.intermediate_size)
        self.experts: ExpertExecutor = LocalExperts(
            spec.num_local_experts, spec.hidden_size, spec.intermediate_size
        )
        self.top_k = spec.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, expert_ids = self.router(x)
        if self.top_k == 1:  # Llama 4: one routed expert per token, rows already in place
            routed_out = self.experts.run_experts(x * scores, expert_ids.view(-1))
            return self.shared_expert(x).add_(routed_out)
        routed_in = x.repeat_interleave(self.top_k, dim=0) * scores.reshape(-1, 1)
        routed_out = self.experts.run_experts(routed_in, expert_ids.reshape(-1))
        out = self.shared_expert(x)
        return out + routed_out.view(x.shape[0], self.top_k, -1).sum(dim=1)
