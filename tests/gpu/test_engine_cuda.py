"""The native engine on a CUDA GPU: same code path as CPU, same numbers, same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, ImageInput, SamplingParams
from maverick_serve.model.attention import CHUNKED_GROUP, GLOBAL_GROUP
from maverick_serve.serving.engine_factory import load_native_engine

pytestmark = pytest.mark.gpu


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: Path, device: str, dtype: str = "float32") -> NativeEngine:
    cfg = NativeEngineConfig(device=device, dtype=dtype, kv_cache_memory_gib=0.25, max_num_batched_tokens=96)
    return NativeEngine.from_pretrained(path, cfg)


def _generate(engine: NativeEngine, prompts: list[list[int]], n: int) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(
            EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        )
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-qknorm"])
def test_cuda_logits_equal_cpu(name: str, tiny_models: dict[str, Path]) -> None:
    ids = _prompt(333, 1)
    cpu = _engine(tiny_models[name], "cpu").score(EngineRequest("a", ids))
    gpu = _engine(tiny_models[name], "cuda").score(EngineRequest("a", ids))
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-3


def test_cuda_batched_greedy_equals_cpu(tiny_model: Path) -> None:
    prompts = [_prompt(n, i) for i, n in enumerate([5, 70, 130, 33, 650])]
    assert _generate(_engine(tiny_model, "cuda"), prompts, 24) == _generate(
        _engine(tiny_model, "cpu"), prompts, 24
    )


def test_cuda_vision_equals_cpu(tiny_model: Path) -> None:
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    cpu = _engine(tiny_model, "cpu").model.encode_images(pixels)
    gpu = _engine(tiny_model, "cuda").model.encode_images(pixels)
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-3


def test_cuda_bf16_long_prompt_keeps_retention(tiny_model: Path) -> None:
    engine = _engine(tiny_model, "cuda", "bfloat16")
    n = 10 * 64 + 5
    engine.add_request(EngineRequest("long", _prompt(n, 3), SamplingParams(temperature=0, max_tokens=4)))
    seq = engine.seqs["long"]
    while seq.num_computed < n:
        engine.step()
    assert seq.blocks.held(CHUNKED_GROUP) == 1 and seq.blocks.held(GLOBAL_GROUP) == 41
    assert engine.cache.k[0].dtype == torch.bfloat16 and engine.cache.k[0].device.type == "cuda"
    image = ImageInput(torch.randn(1, 3, 336, 336), 144, "h")
    patch = engine.spec.image_token_index
    ids = _prompt(10, 1) + [engine.spec.boi_token_index] + [patch] * 144 + [engine.spec.eoi_token_index]
    out = _generate_one(
        engine, EngineRequest("img", ids, SamplingParams(temperature=0, max_tokens=5), [image])
    )
    assert len(out) == 5


def _generate_one(engine: NativeEngine, req: EngineRequest) -> list[int]:
    engine.add_request(req)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == req.request_id:
                tokens.extend(o.new_token_ids)
    return tokens


def test_cuda_kvtier_hit_and_blockwise_attention(tiny_model: Path) -> None:
    from maverick_serve.config.kvtier import KVTierConfig

    cfg = NativeEngineConfig(
        device="cuda", kv_cache_memory_gib=0.25, max_num_batched_tokens=96, attention_key_block=64
    )
    tier = KVTierConfig(block_size=32)
    prompts = [_prompt(300, 4)]
    dense = _generate(_engine(tiny_model, "cuda"), prompts, 8)
    a = load_native_engine(tiny_model, cfg, kvtier=tier)
    assert _generate(a, prompts, 8) == dense  # block-wise global attention on the GPU
    assert a.kv_connector is not None
    a.kv_connector.client.flush()
    b = load_native_engine(tiny_model, cfg, kvtier=tier)
    assert b.kv_connector is not None
    b.kv_connector.client.store = a.kv_connector.client.store
    assert _generate(b, prompts, 8) == dense
    assert b.stats().kvtier["hit_tokens"] == 288
