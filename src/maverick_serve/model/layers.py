"""Small numerical building blocks of the Llama 4 text stack, matching transformers bit for bit."""

from __future__ import annotations

import math

import torch
from torch import nn

from maverick_serve.config.model import TextSpec
from maverick_serve.model.cpu_gemm import PackedGemm


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the Llama 4 order)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ATen's fused rms_norm computes x * rsqrt(mean(x²) + eps) with the same fp32 values as
        # the five ops it replaces; the cast and the weight stay outside it, in Llama 4's order.
        return l2_norm(x, self.eps) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's parameter-free 'L2' QK norm (an RMS normalisation without weight), in fp32."""
    return nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class FeedForward(nn.Module):
    """SwiGLU MLP: dense FFN layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_gemm: PackedGemm | None = None  # set by pack_cpu_gemms
        self.down_gemm: PackedGemm | None = None

    def pack_cpu_gemms(self) -> None:
        self.gate_up_gemm = PackedGemm([self.gate_proj.weight, self.up_proj.weight])
        self.down_gemm = PackedGemm([self.down_proj.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_gemm is not None and self.down_gemm is not None:
            gate, up = self.gate_up_gemm(x).chunk(2, dim=-1)
            return self.down_gemm(nn.functional.silu(gate).mul_(up))
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inverse_frequencies(spec: TextSpec) -> torch.Tensor:
    """RoPE inverse frequencies, with llama3 scaling where the spec asks for it."""
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = spec.rope_scaling
    if sc is None:
        return inv
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / sc.factor, inv)
    # With equal factors (Scout) the medium band is empty and the division is never selected.
    denom = sc.high_freq_factor - sc.low_freq_factor
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (denom if denom else 1.0)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Complex-valued RoPE on interleaved pairs (Llama 4's layout, not rotate-half)."""

    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(spec), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Returns complex frequencies [T, head_dim/2] for absolute positions [T]."""
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = positions[:, None].float() * inv_freq.to(positions.device)
        return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by freqs_cis [T, head_dim/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2).type_as(x)


def temperature_scales(positions: torch.Tensor, spec: TextSpec) -> torch.Tensor:
    """Per-token query scale of NoPE layers: log1p(floor((pos+1)/floor_scale)) * attn_scale + 1."""
    pos = positions.float()
    return torch.log1p(torch.floor((pos + 1.0) / spec.floor_scale)) * spec.attn_scale + 1.0
