"""Write a tiny Llama 4 checkpoint in Hugging Face format, deterministically from a seed.

Same preset + seed ⇒ byte-identical files: tensors are drawn from one seeded generator in
sorted-name order, JSON is written with sorted keys, and the tokenizer is trained on a fixed
corpus. Weights are random; the checkpoint exists to exercise every code path for real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from maverick_serve.config.model import ModelSpec
from maverick_serve.config.presets import TINY_BASE_VOCAB, TINY_NUM_SPECIAL
from maverick_serve.model.llama4 import Llama4Model
from maverick_serve.model.tokenizer_builder import write_tokenizer_files

TEXT_ONLY_SUBDIR = "text-only"
# Refuse presets whose random fp32 weights would not fit a laptop (Scout is ~435 GB in fp32).
MAX_GENERATED_PARAMS = 2_000_000_000


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Scaled so activations stay O(1) and top-1 logits are well separated (stable greedy tests)."""
    if name.endswith(("norm.weight", "layernorm.weight")) or name.endswith(("_layernorm.weight",)):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.02
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    if name.endswith(("class_embedding", "positional_embedding_vlm")):
        return torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    if name.endswith("lm_head.weight"):
        return torch.randn(shape, generator=gen) * (4.0 / math.sqrt(shape[-1]))
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        return torch.randn(shape, generator=gen) / math.sqrt(shape[1])  # [E, in, out]
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])  # nn.Linear [out, in]


def random_state_dict(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = Llama4Model(spec)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_GENERATED_PARAMS:
        raise ValueError(
            f"this preset has {total / 1e9:.1f}B parameters; make-model writes random checkpoints "
            f"of at most {MAX_GENERATED_PARAMS / 1e9:.0f}B (use a tiny preset)"
        )
    gen = torch.Generator().manual_seed(seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.torch_dtype]
    return {n: _init_tensor(n, shapes[n], gen).to(dtype).contiguous() for n in sorted(shapes)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _preprocessor_config(spec: ModelSpec) -> dict[str, Any]:
    assert spec.vision is not None
    return {
        "image_processor_type": "Llama4ImageProcessorFast",
        "processor_class": "Llama4Processor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_patches": 16,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "resize_to_max_canvas": False,
        "size": {"height": spec.vision.image_size, "width": spec.vision.image_size},
    }


def _generation_config(spec: ModelSpec) -> dict[str, Any]:
    return {
        "bos_token_id": spec.text.bos_token_id,
        "eos_token_id": list(spec.text.eos_token_ids),
        "pad_token_id": spec.text.pad_token_id,
    }


def _write_checkpoint(out: Path, spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", spec.to_hf())
    _write_json(out / "generation_config.json", _generation_config(spec))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(
        out,
        base_vocab_size=TINY_BASE_VOCAB,
        num_special=TINY_NUM_SPECIAL,
        model_max_length=spec.text.max_position_embeddings,
    )
    if spec.vision is not None:
        _write_json(out / "preprocessor_config.json", _preprocessor_config(spec))


def make_model(spec: ModelSpec, out: Path, seed: int, text_only_variant: bool = False) -> list[Path]:
    """Write the checkpoint to `out` (and its `Llama4ForCausalLM` twin to `out/text-only`)."""
    if spec.text.vocab_size != TINY_BASE_VOCAB + TINY_NUM_SPECIAL:
        raise ValueError(
            f"make-model builds a tokenizer of {TINY_BASE_VOCAB + TINY_NUM_SPECIAL} tokens; "
            f"the preset's vocab_size is {spec.text.vocab_size}"
        )
    out = Path(out)
    state = random_state_dict(spec, seed)
    _write_checkpoint(out, spec, state)
    written = [out]
    if text_only_variant:
        text_state = {
            n.removeprefix("language_model."): t for n, t in state.items() if n.startswith("language_model.")
        }
        _write_checkpoint(out / TEXT_ONLY_SUBDIR, spec.text_only(), text_state)
        written.append(out / TEXT_ONLY_SUBDIR)
    return written
