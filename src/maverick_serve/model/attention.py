"""Grouped-query attention over a paged KV cache, with Llama 4's two layer kinds.

RoPE layers attend block-diagonally within `attention_chunk_size` chunks; NoPE layers attend to
the whole prefix and scale their queries by position (temperature tuning). The two kinds keep
their KV in separate *layer groups* so the engine can free RoPE-layer blocks of finished chunks
while NoPE layers keep the whole prefix.

The model never sees block tables: the engine's runner turns them into a `ForwardBatch` of flat
slot indices and masks once per step, shared by every layer of a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maverick_serve.config.model import TextSpec
from maverick_serve.model.cpu_gemm import PackedGemm
from maverick_serve.model.layers import apply_rope, l2_norm

CHUNKED_GROUP = "chunked"
GLOBAL_GROUP = "global"


@dataclass
class QueryLayout:
    """How a part's rows are padded into [B, Q] for one batched attention call: row r of the
    part goes to b * max_query_len + i (pad_index[r])."""

    pad_index: torch.Tensor
    num_seqs: int
    max_query_len: int


@dataclass
class GroupBatch:
    """Per layer-group key addressing of one attention part.

    gather_index: [B, K] flat cache slots of the keys each sequence attends to (padding: any slot).
    mask: [B, 1, Q, K] boolean, True where query i of sequence b may attend key j; None for the
        block-wise path of long global attention, which derives causality per key block from
        query_positions [B, Q] (padding rows: 0) and key_lengths [B] (keys are positions 0..len-1).
    key_block: keys per block of the block-wise path.
    queries: the group's own [B, Q] layout where it differs from the part's. Chunked layers split
        a prefill chunk at attention-chunk boundaries (each piece sees only its own chunk's keys),
        so a 256-token chunk attends as 4 × 64 × 64 instead of 256 × 256 with 3/4 masked off.
    """

    gather_index: torch.Tensor
    mask: torch.Tensor | None
    query_positions: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None
    key_block: int = 16384
    queries: QueryLayout | None = None


@dataclass
class AttentionPart:
    """Sequences whose queries attend in one padded, batched call: rows [row_start, row_end) of
    the step. Decodes (one query each) and prefill chunks are separate parts, so a 512-token
    chunk in the step does not pad every decode to 512 queries."""

    row_start: int
    row_end: int
    query_pad_index: torch.Tensor  # part row r -> b * max_query_len + i of the padded [B, Q] layout
    num_seqs: int
    max_query_len: int
    groups: dict[str, GroupBatch]


@dataclass
class ForwardBatch:
    """Everything a forward step needs besides the token embeddings.

    Tokens of all sequences are flattened to T rows (the parts' rows, part after part);
    slot_mapping[group] is the [T] flat cache slot (block * block_size + offset) each new token's
    K/V goes to.
    """

    positions: torch.Tensor
    slot_mapping: dict[str, torch.Tensor]
    parts: list[AttentionPart]
    logits_index: torch.Tensor


class PagedKVCache:
    """Flat K and V tensors per layer: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        spec: TextSpec,
        blocks_per_group: dict[str, int],
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.layer_group: list[str] = [
            CHUNKED_GROUP if spec.uses_rope(i) else GLOBAL_GROUP for i in range(spec.num_hidden_layers)
        ]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for group in self.layer_group:
            shape = (blocks_per_group[group] * block_size, spec.num_key_value_heads, spec.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class Attention(nn.Module):
    def __init__(self, spec: TextSpec, layer: int) -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.use_rope = spec.uses_rope(layer)
        self.use_qk_norm = spec.use_qk_norm and self.use_rope
        self.temperature_tuning = spec.attn_temperature_tuning and not self.use_rope
        self.group = CHUNKED_GROUP if self.use_rope else GLOBAL_GROUP
        h, d = spec.hidden_size, spec.head_dim
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.qkv_gemm: PackedGemm | None = None  # set by pack_cpu_gemms
        self.o_gemm: PackedGemm | None = None

    def pack_cpu_gemms(self) -> None:
        self.qkv_gemm = PackedGemm([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.o_gemm = PackedGemm([self.o_proj.weight])

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        temp_scales: torch.Tensor | None,
        batch: ForwardBatch,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        t, d = x.shape[0], self.spec.head_dim
        if self.qkv_gemm is not None:
            qkv = self.qkv_gemm(x)
            qk_width = (self.num_heads + self.num_kv_heads) * d
            qk = qkv[:, :qk_width].view(t, self.num_heads + self.num_kv_heads, d)
            if self.use_rope:  # q and k side by side: one rotation instead of two
                qk = apply_rope(qk, freqs_cis)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, qk_width:].view(t, self.num_kv_heads, d)
        else:
            q = self.q_proj(x).view(t, self.num_heads, d)
            k = self.k_proj(x).view(t, self.num_kv_heads, d)
            v = self.v_proj(x).view(t, self.num_kv_heads, d)
            if self.use_rope:
                q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        if self.use_qk_norm:
            q, k = l2_norm(q, self.spec.rms_norm_eps), l2_norm(k, self.spec.rms_norm_eps)
        if self.temperature_tuning and temp_scales is not None:
            q = (q * temp_scales[:, None, None]).to(q.dtype)

        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        slots = batch.slot_mapping[self.group]
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
        outs = [self._attend(q[p.row_start : p.row_end], p, k_cache, v_cache) for p in batch.parts]
        attended = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_gemm(attended) if self.o_gemm is not None else self.o_proj(attended)

    def _attend(
        self, q: torch.Tensor, part: AttentionPart, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        d = self.spec.head_dim
        group = part.groups[self.group]
        if group.queries is not None:
            b, qlen, pad_index = group.queries.num_seqs, group.queries.max_query_len, group.queries.pad_index
        else:
            b, qlen, pad_index = part.num_seqs, part.max_query_len, part.query_pad_index
        if qlen == 1:  # decodes: no padding, the rows are the sequences
            queries = q.view(b, 1, self.num_heads, d).transpose(1, 2)
        else:
            padded = q.new_zeros(b * qlen, self.num_heads, d)
            padded[pad_index] = q
            queries = padded.view(b, qlen, self.num_heads, d).transpose(1, 2)  # [B, h, Q, d]
        if group.mask is None:
            out = blockwise_attention(queries, k_cache, v_cache, group, d**-0.5).to(q.dtype)
        else:
            keys = gather_keys(k_cache, group.gather_index).to(q.dtype).transpose(1, 2)  # [B, kvh, K, d]
            values = gather_keys(v_cache, group.gather_index).to(q.dtype).transpose(1, 2)
            out = nn.functional.scaled_dot_product_attention(
                queries, keys, values, attn_mask=group.mask, scale=d**-0.5, enable_gqa=True
            )
        out = out.transpose(1, 2).reshape(b * qlen, self.num_heads * d)
        return out if qlen == 1 else out[pad_index]


def gather_keys(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache [slots, kvh, d] rows at index [B, K] → [B, K, kvh, d]. `index_select` on the flat
    index copies rows ~5× faster on CPU than advanced indexing (`cache[index]`), same values."""
    return cache.index_select(0, index.reshape(-1)).view(*index.shape, *cache.shape[1:])


def blockwise_attention(
    queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: GroupBatch, scale: float
) -> torch.Tensor:
    """Causal attention over keys gathered one block at a time with an online softmax.

    Memory is O(Q × key_block) per head instead of O(Q × K): a 10M-token prefix is read in blocks
    and never materialised as one score matrix (the flash-attention recurrence, in fp32)."""
    assert group.query_positions is not None and group.key_lengths is not None
    b, h, qlen, d = queries.shape
    kvh = k_cache.shape[1]
    rep = h // kvh
    q = queries.float()
    qpos = group.query_positions[:, None, :, None]  # [B, 1, Q, 1]
    klen = group.key_lengths[:, None, None, None]
    out = torch.zeros(b, h, qlen, d, dtype=torch.float32, device=q.device)
    row_max = torch.full((b, h, qlen, 1), float("-inf"), device=q.device)
    row_sum = torch.zeros(b, h, qlen, 1, device=q.device)
    total = group.gather_index.shape[1]
    for start in range(0, total, group.key_block):
        idx = group.gather_index[:, start : start + group.key_block]
        # [B, h, kb, d]
        keys = gather_keys(k_cache, idx).float().transpose(1, 2).repeat_interleave(rep, dim=1)
        values = gather_keys(v_cache, idx).float().transpose(1, 2).repeat_interleave(rep, dim=1)
        kpos = torch.arange(start, start + idx.shape[1], device=q.device)[None, None, None, :]
        visible = (kpos <= qpos) & (kpos < klen)
        scores = (q @ keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(scores - safe_max)
        correction = torch.exp(
            torch.where(torch.isinf(row_max), torch.full_like(row_max, float("-inf")), row_max - safe_max)
        )
        row_sum = row_sum * correction + probs.sum(dim=-1, keepdim=True)
        out = out * correction + probs @ values
        row_max = new_max
    return out / row_sum
