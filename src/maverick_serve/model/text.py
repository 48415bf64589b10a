"""The Llama 4 text stack over a paged KV cache. Module names mirror Hugging Face's tensor names."""

from __future__ import annotations

import torch
from torch import nn

from maverick_serve.config.model import TextSpec
from maverick_serve.model.attention import Attention, ForwardBatch, PagedKVCache
from maverick_serve.model.cpu_gemm import PackedGemm
from maverick_serve.model.layers import FeedForward, RMSNorm, RotaryEmbedding, temperature_scales
from maverick_serve.model.moe import MoEFeedForward


class DecoderLayer(nn.Module):
    def __init__(self, spec: TextSpec, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer)
        self.is_moe = spec.is_moe(layer)
        self.feed_forward: nn.Module = (
            MoEFeedForward(spec) if self.is_moe else FeedForward(spec.hidden_size, spec.intermediate_size_mlp)
        )
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        temp_scales: torch.Tensor | None,
        batch: ForwardBatch,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis, temp_scales, batch, cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(spec, i) for i in range(spec.num_hidden_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(spec)

    def forward(self, embeds: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        freqs_cis = self.rotary_emb(batch.positions)
        temp = temperature_scales(batch.positions, self.spec) if self.spec.attn_temperature_tuning else None
        x = embeds
        for layer in self.layers:
            x = layer(x, freqs_cis, temp, batch, cache)
        return self.norm(x)


class CausalLM(nn.Module):
    """`Llama4ForCausalLM`: text model plus LM head."""

    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.model = TextModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.lm_head_gemm: PackedGemm | None = None  # set by pack_cpu_gemms

    def pack_cpu_gemms(self) -> None:
        self.lm_head_gemm = PackedGemm([self.lm_head.weight])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def forward(self, embeds: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Logits [len(batch.logits_index), vocab] in fp32."""
        hidden = self.model(embeds, batch, cache)[batch.logits_index]
        logits = self.lm_head_gemm(hidden) if self.lm_head_gemm is not None else self.lm_head(hidden)
        return logits.float()
