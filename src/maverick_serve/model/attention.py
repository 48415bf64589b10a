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
from maverick_serve.model.layers import apply_rope, l2_norm

CHUNKED_GROUP = "chunked"
GLOBAL_GROUP = "global"


@dataclass
class GroupBatch:
    """Per layer-group addressing of one forward step.

    slot_mapping: [T] flat cache slot (block * block_size + offset) each new token's K/V goes to.
    gather_index: [B, K] flat cache slots of the keys each sequence attends to (padding: any slot).
    mask: [B, 1, Q, K] boolean, True where query i of sequence b may attend key j.
    """

    slot_mapping: torch.Tensor
    gather_index: torch.Tensor
    mask: torch.Tensor


@dataclass
class ForwardBatch:
    """Everything a forward step needs besides the token embeddings.

    Tokens of all sequences are flattened to T rows; `query_pad_index` places row t at
    `b * max_query_len + i` of a padded [B, Q] layout so attention runs as one batched call.
    """

    positions: torch.Tensor
    query_pad_index: torch.Tensor
    num_seqs: int
    max_query_len: int
    groups: dict[str, GroupBatch]
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

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        temp_scales: torch.Tensor | None,
        batch: ForwardBatch,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        t, d = x.shape[0], self.spec.head_dim
        q = self.q_proj(x).view(t, self.num_heads, d)
        k = self.k_proj(x).view(t, self.num_kv_heads, d)
        v = self.v_proj(x).view(t, self.num_kv_heads, d)
        if self.use_rope:
            q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        if self.use_qk_norm:
            q, k = l2_norm(q, self.spec.rms_norm_eps), l2_norm(k, self.spec.rms_norm_eps)
        if self.temperature_tuning and temp_scales is not None:
            q = (q * temp_scales[:, None, None]).to(q.dtype)

        group = batch.groups[self.group]
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        k_cache.index_copy_(0, group.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, group.slot_mapping, v.to(v_cache.dtype))
        keys = k_cache[group.gather_index].to(q.dtype).transpose(1, 2)  # [B, kvh, K, d]
        values = v_cache[group.gather_index].to(q.dtype).transpose(1, 2)

        b, qlen = batch.num_seqs, batch.max_query_len
        padded = q.new_zeros(b * qlen, self.num_heads, d)
        padded[batch.query_pad_index] = q
        queries = padded.view(b, qlen, self.num_heads, d).transpose(1, 2)  # [B, h, Q, d]
        out = nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=d**-0.5, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(b * qlen, self.num_heads * d)[batch.query_pad_index]
        return self.o_proj(out)
