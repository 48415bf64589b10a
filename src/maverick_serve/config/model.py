"""Typed Llama 4 model specs, parsed from and written to Hugging Face `config.json`.

The spec is the one place the model's shape lives: the model code, the KV-cache layout, the
checkpoint writer and the capacity planner all read it. Hugging Face keys we do not use but
that are harmless (initializers, dropout at inference, ...) are accepted and dropped; keys
that would change the computation and that we do not implement are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TEXT_ARCH: Final = "Llama4ForCausalLM"
MULTIMODAL_ARCH: Final = "Llama4ForConditionalGeneration"

# Keys present in real Llama 4 configs that do not change inference.
_IGNORED_TEXT_KEYS = frozenset(
    {
        "model_type",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "torch_dtype",
        "dtype",
        "for_llm_compressor",
        "interleave_moe_layer_step",
        "no_rope_layer_interval",
        "layer_types",
        "cache_implementation",
        "transformers_version",
        "architectures",
        "_name_or_path",
        "tie_word_embeddings",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "pretraining_tp",
    }
)
_IGNORED_VISION_KEYS = frozenset(
    {
        "model_type",
        "initializer_range",
        "attention_dropout",
        "projector_dropout",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
_IGNORED_TOP_KEYS = frozenset(
    {
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "tie_word_embeddings",
        "_name_or_path",
        "quantization_config",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "pad_token_id",
    }
)


class ModelConfigError(ValueError):
    """A model config field is unsupported or inconsistent; the message names the field."""


class RopeScaling(BaseModel):
    """Llama 3-style frequency scaling (Scout uses it; Maverick does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rope_type: Literal["llama3"] = Field("llama3", description="Only the llama3 scheme is used by Llama 4.")
    factor: float = Field(16.0, gt=0, description="Divisor applied to low frequencies.")
    low_freq_factor: float = Field(1.0, gt=0, description="Wavelength threshold factor for low frequencies.")
    high_freq_factor: float = Field(
        1.0, gt=0, description="Wavelength threshold factor for high frequencies."
    )
    original_max_position_embeddings: int = Field(8192, gt=0, description="Pre-training context length.")


class TextSpec(BaseModel):
    """The Llama 4 text stack (iRoPE attention, interleaved dense/MoE feed-forward)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(202048, gt=0, description="Rows of the embedding and LM head.")
    hidden_size: int = Field(5120, gt=0, description="Residual stream width.")
    intermediate_size: int = Field(
        8192, gt=0, description="Width of each routed expert and the shared expert."
    )
    intermediate_size_mlp: int = Field(16384, gt=0, description="Width of the dense FFN layers.")
    num_hidden_layers: int = Field(48, gt=0, description="Decoder layers.")
    num_attention_heads: int = Field(40, gt=0, description="Query heads.")
    num_key_value_heads: int = Field(8, gt=0, description="Key/value heads (grouped-query attention).")
    head_dim: int = Field(128, gt=0, description="Per-head width.")
    hidden_act: Literal["silu"] = Field("silu", description="FFN activation; Llama 4 uses SiLU.")
    rms_norm_eps: float = Field(1e-5, gt=0, description="Epsilon of RMSNorm and the QK L2 norm.")
    rope_theta: float = Field(500000.0, gt=0, description="RoPE base.")
    rope_scaling: RopeScaling | None = Field(None, description="Llama 3 RoPE scaling, or none.")
    num_local_experts: int = Field(128, gt=0, description="Routed experts per MoE layer.")
    num_experts_per_tok: int = Field(1, gt=0, description="Experts chosen per token (top-k); Llama 4 uses 1.")
    moe_layers: tuple[int, ...] = Field(
        tuple(range(1, 48, 2)), description="Indices of MoE layers; the others are dense FFN layers."
    )
    no_rope_layers: tuple[int, ...] = Field(
        tuple(int((i + 1) % 4 != 0) for i in range(48)),
        description="Per layer: 1 = RoPE + chunked attention, 0 = NoPE global attention.",
    )
    attention_chunk_size: int = Field(
        8192, gt=0, description="Block-diagonal attention chunk of RoPE layers."
    )
    use_qk_norm: bool = Field(False, description="Parameter-free L2 norm of q and k on RoPE layers.")
    attn_temperature_tuning: bool = Field(True, description="Scale NoPE-layer queries with position.")
    floor_scale: int = Field(8192, gt=0, description="Temperature tuning: positions per step.")
    attn_scale: float = Field(0.1, description="Temperature tuning: strength.")
    max_position_embeddings: int = Field(1048576, gt=0, description="Longest context the model supports.")
    bos_token_id: int = Field(200000, ge=0, description="<|begin_of_text|>.")
    eos_token_ids: tuple[int, ...] = Field(
        (200001, 200007, 200008), description="Tokens that end generation."
    )
    pad_token_id: int = Field(200018, ge=0, description="<|finetune_right_pad|>.")
    attention_bias: Literal[False] = Field(False, description="Llama 4 attention has no biases.")

    @model_validator(mode="after")
    def _check_consistency(self) -> TextSpec:
        n = self.num_hidden_layers
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"text_config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"text_config.head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.no_rope_layers) < n:
            raise ModelConfigError(
                f"text_config.no_rope_layers has {len(self.no_rope_layers)} entries; needs at least "
                f"num_hidden_layers={n}"
            )
        if any(v not in (0, 1) for v in self.no_rope_layers):
            raise ModelConfigError("text_config.no_rope_layers entries must be 0 (NoPE) or 1 (RoPE)")
        bad = [i for i in self.moe_layers if not 0 <= i < n]
        if bad:
            raise ModelConfigError(f"text_config.moe_layers {bad} outside 0..{n - 1}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ModelConfigError(
                f"text_config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if not self.eos_token_ids:
            raise ModelConfigError("text_config.eos_token_id must name at least one token")
        for name, tok in (("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)):
            if tok >= self.vocab_size:
                raise ModelConfigError(f"text_config.{name}={tok} is not below vocab_size={self.vocab_size}")
        return self

    def uses_rope(self, layer: int) -> bool:
        """RoPE layers use chunked attention; NoPE layers attend to the whole prefix."""
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def chunked_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.uses_rope(i))

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if not self.uses_rope(i))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> TextSpec:
        cfg = dict(cfg)
        out: dict[str, Any] = {}
        rope_params = cfg.pop("rope_parameters", None)
        rope_scaling = cfg.pop("rope_scaling", None)
        if rope_params:  # transformers >= 5 layout
            rope_params = dict(rope_params)
            cfg.setdefault("rope_theta", rope_params.pop("rope_theta", 500000.0))
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.pop("rope_type", rope_scaling.pop("type", "llama3"))
            if rope_type != "llama3":
                raise ModelConfigError(
                    f"text_config.rope_scaling.rope_type={rope_type!r} is unsupported (only 'llama3')"
                )
            out["rope_scaling"] = RopeScaling(rope_type="llama3", **rope_scaling)
        n = int(cfg.get("num_hidden_layers", 48))
        if cfg.get("moe_layers") is None:
            step = int(cfg.get("interleave_moe_layer_step", 1))
            if step < 1:
                raise ModelConfigError(f"text_config.interleave_moe_layer_step must be ≥ 1, got {step}")
            cfg["moe_layers"] = list(range(step - 1, n, step))
        if not cfg.get("no_rope_layers"):
            interval = int(cfg.get("no_rope_layer_interval", 4))
            cfg["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(n)]
        eos = cfg.pop("eos_token_id", None)
        if eos is not None:
            out["eos_token_ids"] = tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
        if cfg.get("attention_bias"):
            raise ModelConfigError("text_config.attention_bias=true is unsupported (Llama 4 has none)")
        if cfg.get("pad_token_id") is None:
            cfg.pop("pad_token_id", None)
        if cfg.get("head_dim") is None and "hidden_size" in cfg:
            cfg["head_dim"] = cfg["hidden_size"] // cfg.get("num_attention_heads", 40)
        if "attn_temperature_tuning" in cfg:  # Scout's config stores 4 (truthy) here
            cfg["attn_temperature_tuning"] = bool(cfg["attn_temperature_tuning"])
        known = set(cls.model_fields)
        for key, value in cfg.items():
            if key in _IGNORED_TEXT_KEYS:
                continue
            if key not in known:
                raise ModelConfigError(f"text_config.{key} is not a supported Llama 4 field")
            out[key] = value
        return cls(**out)

    def to_hf(self) -> dict[str, Any]:
        """The transformers (v4 and v5 compatible) `text_config` dict."""
        d: dict[str, Any] = self.model_dump(exclude={"eos_token_ids", "rope_scaling", "moe_layers"})
        d["moe_layers"] = list(self.moe_layers)
        d["no_rope_layers"] = list(self.no_rope_layers)
        d["eos_token_id"] = list(self.eos_token_ids)
        d["rope_scaling"] = self.rope_scaling.model_dump() if self.rope_scaling else None
        step = self.moe_layers[1] - self.moe_layers[0] if len(self.moe_layers) > 1 else 1
        d["interleave_moe_layer_step"] = step
        d["model_type"] = "llama4_text"
        d["tie_word_embeddings"] = False
        return d


class VisionSpec(BaseModel):
    """The Llama 4 vision tower, pixel-shuffle adapter and tile geometry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(1408, gt=0, description="Encoder width.")
    num_hidden_layers: int = Field(34, gt=0, description="Encoder layers.")
    num_attention_heads: int = Field(16, gt=0, description="Encoder heads.")
    intermediate_size: int = Field(5632, gt=0, description="Encoder MLP width; must equal hidden/ratio².")
    image_size: int = Field(336, gt=0, description="Tile side in pixels.")
    patch_size: int = Field(14, gt=0, description="Patch side in pixels.")
    num_channels: int = Field(3, gt=0, description="Input channels (RGB).")
    norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")
    pixel_shuffle_ratio: float = Field(0.5, gt=0, le=1, description="Pixel-shuffle downsampling ratio.")
    projector_input_dim: int = Field(4096, gt=0, description="Adapter MLP hidden width.")
    projector_output_dim: int = Field(4096, gt=0, description="Adapter MLP output width.")
    vision_output_dim: int = Field(4096, gt=0, description="Vision feature width fed to the projector.")
    rope_theta: float = Field(10000.0, gt=0, description="Base of the 2-D vision RoPE.")
    hidden_act: Literal["gelu"] = Field("gelu", description="Encoder activation.")
    multi_modal_projector_bias: Literal[False] = Field(False, description="The projector has no bias.")

    @model_validator(mode="after")
    def _check_consistency(self) -> VisionSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ModelConfigError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        shuffled = self.hidden_size / self.pixel_shuffle_ratio**2
        if self.intermediate_size != shuffled:
            raise ModelConfigError(
                "vision_config.intermediate_size must equal hidden_size / pixel_shuffle_ratio² "
                f"(the pixel-shuffled width the adapter takes): {self.hidden_size} / "
                f"{self.pixel_shuffle_ratio}² = {shuffled:g}, got {self.intermediate_size}"
            )
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            raise ModelConfigError(
                "vision_config.projector_input_dim, projector_output_dim and vision_output_dim must be "
                f"equal (got {self.projector_input_dim}, {self.projector_output_dim}, "
                f"{self.vision_output_dim})"
            )
        side = self.image_size // self.patch_size
        if (side * self.pixel_shuffle_ratio) != int(side * self.pixel_shuffle_ratio):
            raise ModelConfigError(
                f"vision_config: patches per side ({side}) × pixel_shuffle_ratio must be an integer"
            )
        return self

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int((side * self.pixel_shuffle_ratio) ** 2)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> VisionSpec:
        cfg = dict(cfg)
        rope_params = cfg.pop("rope_parameters", None)
        if rope_params:
            cfg.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
        out: dict[str, Any] = {}
        known = set(cls.model_fields)
        for key, value in cfg.items():
            if key in _IGNORED_VISION_KEYS:
                continue
            if key not in known:
                raise ModelConfigError(f"vision_config.{key} is not a supported Llama 4 field")
            out[key] = value
        return cls(**out)

    def to_hf(self) -> dict[str, Any]:
        d = self.model_dump()
        d["model_type"] = "llama4_vision_model"
        d["vision_feature_layer"] = -1
        d["vision_feature_select_strategy"] = "default"
        return d


class ModelSpec(BaseModel):
    """A whole Llama 4 checkpoint: text stack, optional vision tower, image token ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["Llama4ForConditionalGeneration", "Llama4ForCausalLM"] = Field(
        MULTIMODAL_ARCH, description="Hugging Face architecture name."
    )
    text: TextSpec = Field(default_factory=TextSpec, description="Text stack.")
    vision: VisionSpec | None = Field(None, description="Vision tower; None for text-only checkpoints.")
    boi_token_index: int = Field(200080, description="<|image_start|> id.")
    eoi_token_index: int = Field(200081, description="<|image_end|> id.")
    image_token_index: int = Field(200092, description="<|patch|> id: positions that receive image features.")
    torch_dtype: Literal["bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="dtype the weights are stored in."
    )

    @model_validator(mode="after")
    def _check_arch(self) -> ModelSpec:
        if self.architecture == MULTIMODAL_ARCH and self.vision is None:
            raise ModelConfigError("vision_config is required for Llama4ForConditionalGeneration")
        if self.architecture == TEXT_ARCH and self.vision is not None:
            raise ModelConfigError("Llama4ForCausalLM is text-only: drop vision_config")
        for name in ("boi_token_index", "eoi_token_index", "image_token_index"):
            if self.vision is not None and getattr(self, name) >= self.text.vocab_size:
                raise ModelConfigError(f"{name}={getattr(self, name)} is not below vocab_size")
        return self

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    def text_only(self) -> ModelSpec:
        return self.model_copy(update={"architecture": TEXT_ARCH, "vision": None})

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelSpec:
        archs = cfg.get("architectures") or [MULTIMODAL_ARCH if "text_config" in cfg else TEXT_ARCH]
        arch = archs[0]
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        if arch == TEXT_ARCH:
            text_cfg = {k: v for k, v in cfg.items() if k not in ("architectures",)}
            return cls(architecture=TEXT_ARCH, text=TextSpec.from_hf(text_cfg), torch_dtype=dtype)
        if arch != MULTIMODAL_ARCH:
            raise ModelConfigError(
                f"architectures={archs!r} is unsupported (expected {MULTIMODAL_ARCH} or {TEXT_ARCH})"
            )
        unknown = (
            set(cfg)
            - _IGNORED_TOP_KEYS
            - {
                "architectures",
                "text_config",
                "vision_config",
                "boi_token_index",
                "eoi_token_index",
                "image_token_index",
            }
        )
        if unknown:
            raise ModelConfigError(f"config fields {sorted(unknown)} are not supported Llama 4 fields")
        if "text_config" not in cfg or "vision_config" not in cfg:
            raise ModelConfigError(f"{MULTIMODAL_ARCH} config needs text_config and vision_config")
        return cls(
            architecture=MULTIMODAL_ARCH,
            text=TextSpec.from_hf(cfg["text_config"]),
            vision=VisionSpec.from_hf(cfg["vision_config"]),
            boi_token_index=cfg.get("boi_token_index", 200080),
            eoi_token_index=cfg.get("eoi_token_index", 200081),
            image_token_index=cfg.get("image_token_index", 200092),
            torch_dtype=dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        if self.architecture == TEXT_ARCH:
            d = self.text.to_hf()
            d["architectures"] = [TEXT_ARCH]
            d["torch_dtype"] = self.torch_dtype
            return d
        assert self.vision is not None
        return {
            "architectures": [MULTIMODAL_ARCH],
            "model_type": "llama4",
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
            "image_token_index": self.image_token_index,
            "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
            "text_config": self.text.to_hf(),
            "vision_config": self.vision.to_hf(),
        }

    @classmethod
    def from_pretrained_dir(cls, path: Path) -> ModelSpec:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelConfigError(f"{cfg_path} not found: --model must be a Hugging Face checkpoint folder")
        try:
            data = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{cfg_path} is not valid JSON: {exc}") from exc
        return cls.from_hf(data)
