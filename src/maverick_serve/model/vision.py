"""Llama 4 vision tower: unfold-conv patches, class token, 2-D RoPE encoder, pixel-shuffle adapter.

Input: tiles [N, 3, tile, tile] (already normalised). Output: features [N, tokens_per_tile,
vision_output_dim]; the multimodal projector then maps them to the text width. Module names
mirror Hugging Face's `vision_model.*` tensor names.
"""

from __future__ import annotations

import torch
from torch import nn

from maverick_serve.config.model import VisionSpec


def vision_rope_frequencies(spec: VisionSpec) -> torch.Tensor:
    """Complex 2-D RoPE table [patches + 1, 1, head_dim / 2]; the class token gets no rotation."""
    side = spec.image_size // spec.patch_size
    idx = torch.arange(side**2, dtype=torch.int32).reshape(side**2, 1)
    idx = torch.cat([idx, idx[:1]], dim=0)
    idx[-1, -1] = -2  # the class token
    fx, fy = idx % side, idx // side
    freq_dim = spec.hidden_size // spec.num_attention_heads // 2
    rope_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    freqs_x = ((fx + 1)[..., None] * rope_freq[None, None, :]).repeat_interleave(2, dim=-1)
    freqs_y = ((fy + 1)[..., None] * rope_freq[None, None, :]).repeat_interleave(2, dim=-1)
    freqs = torch.cat([freqs_x, freqs_y], dim=-1).float().contiguous()[..., ::2]
    freqs = freqs.masked_fill(idx.reshape(-1, 1, 1) < 0, 0)
    return torch.view_as_complex(torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1))


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, d] rotated by freqs [S, 1, d/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.view(1, freqs.shape[0], 1, -1)).flatten(3).type_as(x)


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_attention_heads
        self.head_dim = h // self.num_heads
        self.q_proj = nn.Linear(h, h, bias=True)
        self.k_proj = nn.Linear(h, h, bias=True)
        self.v_proj = nn.Linear(h, h, bias=True)
        self.o_proj = nn.Linear(h, h, bias=True)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = _rotate(self.q_proj(x).view(shape), freqs).transpose(1, 2)
        k = _rotate(self.k_proj(x).view(shape), freqs).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class VisionMLP(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=True)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.self_attn = VisionAttention(spec)
        self.mlp = VisionMLP(spec)
        self.input_layernorm = nn.LayerNorm(spec.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(spec.hidden_size)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), freqs)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(spec) for _ in range(spec.num_hidden_layers)])


class PatchEmbedding(nn.Module):
    """Non-overlapping patches flattened channel-major, then one linear map (HF's unfold-conv)."""

    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.patch_size = spec.patch_size
        self.linear = nn.Linear(spec.num_channels * spec.patch_size**2, spec.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = nn.functional.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.permute(0, 2, 1))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, P, C] → [B, P·ratio², C/ratio²], exactly as Llama 4 reorders patches."""
    b, p, _ = x.shape
    side = int(p**0.5)
    x = x.view(b, side, side, -1)
    _, h, w, c = x.shape
    x = x.view(b, h, int(w * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(h * ratio), int(w * ratio), int(c / ratio**2)).permute(0, 2, 1, 3).contiguous()
    return x.view(b, -1, x.shape[-1])


class AdapterMLP(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.intermediate_size, spec.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(spec.projector_output_dim, spec.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fc2(nn.functional.gelu(self.fc1(x))))


class PixelShuffleAdapter(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.ratio = spec.pixel_shuffle_ratio
        self.mlp = AdapterMLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionModel(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        num_positions = (spec.image_size // spec.patch_size) ** 2 + 1
        self.patch_embedding = PatchEmbedding(spec)
        self.class_embedding = nn.Parameter(torch.zeros(h))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(num_positions, h))
        self.layernorm_pre = nn.LayerNorm(h)
        self.layernorm_post = nn.LayerNorm(h)
        self.model = VisionEncoder(spec)
        self.vision_adapter = PixelShuffleAdapter(spec)
        self.register_buffer("rope_freqs", vision_rope_frequencies(spec), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.class_embedding.dtype))
        cls = self.class_embedding.expand(x.shape[0], 1, x.shape[-1])
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm
        x = self.layernorm_pre(x)
        freqs = self.rope_freqs.to(x.device)
        for layer in self.model.layers:
            x = layer(x, freqs)
        x = self.layernorm_post(x)[:, :-1, :]
        return self.vision_adapter(x)


class MultiModalProjector(nn.Module):
    def __init__(self, spec: VisionSpec, text_hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(spec.vision_output_dim, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)
