"""Engine settings: device, dtype, paged KV cache and scheduler budgets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["float32", "bfloat16", "float16"]


class EngineConfig(BaseModel):
    """Settings of one engine replica (the native backend)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["native"] = Field("native", description="Engine implementation.")
    device: str = Field("cpu", description="Torch device: 'cpu', 'cuda' or 'cuda:N'.")
    dtype: DType = Field("float32", description="Compute dtype of weights and KV cache.")
    block_size: int = Field(
        16, gt=0, description="Tokens per KV-cache block; must divide the model's attention_chunk_size."
    )
    num_kv_blocks: int | None = Field(
        None, gt=0, description="KV blocks per layer group; None sizes it from kv_cache_memory_gib."
    )
    kv_cache_memory_gib: float = Field(
        1.0, gt=0, description="Memory for the KV cache when num_kv_blocks is None."
    )
    max_num_seqs: int = Field(64, gt=0, description="Most requests decoded together in one step.")
    max_num_batched_tokens: int = Field(
        512, gt=0, description="Per-step token budget; long prompts are prefilled in chunks of at most this."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + output; None uses the model's max_position_embeddings."
    )
    attention_key_block: int = Field(
        16384,
        gt=0,
        description="Global-layer steps with more keys than this attend block-wise over blocks of "
        "this many keys (bounded memory for very long prompts).",
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prefixes.")
    max_logprobs: int = Field(20, ge=0, description="Most top logprobs a request may ask for.")
    max_images_per_request: int = Field(
        8, ge=0, description="Most images in one request (Maverick was tested with 8)."
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(
        8192 * 8192, gt=0, description="Largest decoded image (width × height) accepted."
    )
    num_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads on CPU; None leaves torch's default."
    )
    seed: int = Field(0, description="Seed of requests that set none, so sampling is reproducible.")
