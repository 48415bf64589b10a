"""Our Llama 4 forward pass against transformers' modeling code on the same tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, ImageInput
from maverick_serve.model.checkpoint import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hf_models(tiny_models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    out = {}
    for name, path in tiny_models.items():
        out[name] = transformers.Llama4ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32
        ).eval()
        out[name + "/text"] = transformers.Llama4ForCausalLM.from_pretrained(
            path / "text-only", dtype=torch.float32
        ).eval()
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-qknorm"])
@pytest.mark.parametrize("length", [63, 64, 200, 333])
def test_text_logits_match_transformers(
    name: str, length: int, tiny_models: dict[str, Path], hf_models: dict[str, torch.nn.Module]
) -> None:
    """Prompts up to 5 attention chunks long (chunk = 64): chunked and global layers both matter."""
    engine = NativeEngine.from_pretrained(tiny_models[name], NativeEngineConfig(kv_cache_memory_gib=0.05))
    ids = _prompt(length, seed=length)
    ours = engine.score(EngineRequest("r", ids))
    with torch.no_grad():
        ref_mm = hf_models[name](input_ids=torch.tensor([ids])).logits[0]
        ref_text = hf_models[name + "/text"](input_ids=torch.tensor([ids])).logits[0]
    assert ours.shape == ref_mm.shape == (length, 2048)
    assert (ours - ref_mm).abs().max().item() <= TOL
    assert (ours - ref_text).abs().max().item() <= TOL
    # The logits are not trivially small: a tolerance of 1e-4 is meaningful.
    assert ref_mm.abs().max().item() > 1.0


def test_text_only_checkpoint_loads_into_same_logits(tiny_models: dict[str, Path]) -> None:
    cfg = NativeEngineConfig(kv_cache_memory_gib=0.05)
    mm = NativeEngine.from_pretrained(tiny_models["tiny"], cfg)
    text = NativeEngine.from_pretrained(tiny_models["tiny"] / "text-only", cfg)
    ids = _prompt(100, seed=7)
    assert torch.equal(mm.score(EngineRequest("a", ids)), text.score(EngineRequest("a", ids)))


@pytest.mark.parametrize("name", ["tiny", "tiny-qknorm"])
def test_vision_features_match_transformers(
    name: str, tiny_models: dict[str, Path], hf_models: dict[str, torch.nn.Module]
) -> None:
    ours = load_model(tiny_models[name])
    pixels = torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = ours.vision_model(pixels)
        ref = hf_models[name].vision_model(pixels).last_hidden_state
        ref_projected = hf_models[name].multi_modal_projector(ref.reshape(-1, ref.shape[-1]))
        projected = ours.encode_images(pixels)
    assert feats.shape == ref.shape == (3, 144, 128)
    assert (feats - ref).abs().max().item() <= TOL
    assert (projected - ref_projected).abs().max().item() <= TOL


def test_multimodal_logits_match_transformers(
    tiny_models: dict[str, Path], hf_models: dict[str, torch.nn.Module]
) -> None:
    """Image features land on the <|patch|> positions exactly as transformers places them."""
    ours = NativeEngine.from_pretrained(tiny_models["tiny"], NativeEngineConfig(kv_cache_memory_gib=0.05))
    patch = ours.spec.image_token_index
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    ids = (
        _prompt(20, 1)
        + [ours.spec.boi_token_index]
        + [patch] * 144
        + _prompt(10, 2)
        + [patch] * 144
        + [ours.spec.eoi_token_index]
        + _prompt(30, 3)
    )
    image = ImageInput(pixel_values=pixels, num_patch_tokens=288, content_hash="x")
    logits = ours.score(EngineRequest("mm", ids, images=[image]))
    with torch.no_grad():
        ref = hf_models["tiny"](input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        text_only = hf_models["tiny"](input_ids=torch.tensor([ids])).logits[0]
    assert (logits - ref).abs().max().item() <= TOL
    assert (text_only - ref).abs().max().item() > 1e-2  # the image really changed the logits


@pytest.mark.parametrize("key_block", [40, 128])
def test_blockwise_global_attention_matches_transformers(
    key_block: int, tiny_models: dict[str, Path], hf_models: dict[str, torch.nn.Module]
) -> None:
    """Long-prompt path: global layers attend over key blocks with an online softmax."""
    cfg = NativeEngineConfig(kv_cache_memory_gib=0.05, attention_key_block=key_block)
    engine = NativeEngine.from_pretrained(tiny_models["tiny-qknorm"], cfg)
    ids = _prompt(333, seed=9)
    ours = engine.score(EngineRequest("r", ids))
    with torch.no_grad():
        ref = hf_models["tiny-qknorm"](input_ids=torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= TOL
