"""Images through the engine: bytes → tiles → prompt layout → vision tower → generation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maverick_serve.config import ModelSpec, NativeEngineConfig
from maverick_serve.engine.inputs import InputProcessor
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import InvalidRequestError, SamplingParams

transformers = pytest.importorskip("transformers")


def _png(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tiny_model: Path) -> tuple[NativeEngine, InputProcessor]:
    cfg = NativeEngineConfig(
        kv_cache_memory_gib=0.05, max_num_batched_tokens=256, max_image_pixels=2000 * 2000
    )
    engine = NativeEngine.from_pretrained(tiny_model, cfg)
    return engine, InputProcessor.from_pretrained(tiny_model, engine.spec, cfg)


def _chat(n_images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [
        {"type": "text", "text": "What is in the picture?"}
    ]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def test_image_request_matches_transformers_greedy(
    setup: tuple[NativeEngine, InputProcessor], tiny_model: Path
) -> None:
    engine, proc = setup
    req = proc.build_chat(
        "img",
        _chat(2),
        [_png(500, 300, 1), _png(336, 336, 2)],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    )
    # 500x300 → a 1x2 grid + global tile: 3 tiles; 336x336 → 1 tile.
    assert [img.pixel_values.shape[0] for img in req.images] == [3, 1]
    assert sum(t == engine.spec.image_token_index for t in req.prompt_token_ids) == 4 * 144
    engine.add_request(req)
    tokens: list[int] = []
    while engine.has_unfinished_requests():  # chunked prefill: 256 tokens a step over ~650
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pixels = torch.cat([img.pixel_values for img in req.images])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor([req.prompt_token_ids]),
            pixel_values=pixels,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert tokens == ref[0, len(req.prompt_token_ids) :].tolist()


def test_same_image_reuses_prefix_cache_different_image_does_not(
    setup: tuple[NativeEngine, InputProcessor],
) -> None:
    engine, proc = setup
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def run(rid: str, img: bytes) -> None:
        engine.add_request(proc.build_chat(rid, _chat(1), [img], params.model_copy()))
        while engine.has_unfinished_requests():
            engine.step()

    run("a", _png(336, 336, 5))
    before = engine.stats().prefix_cache_hit_tokens
    run("b", _png(336, 336, 5))
    hit_same = engine.stats().prefix_cache_hit_tokens - before
    run("c", _png(336, 336, 6))  # same size, same token ids, different pixels
    hit_other = engine.stats().prefix_cache_hit_tokens - before - hit_same
    prompt = proc.build_chat("probe", _chat(1), [_png(336, 336, 6)]).prompt_token_ids
    before_image = prompt.index(engine.spec.image_token_index) // 16 * 16
    assert hit_same >= 144
    assert hit_other == before_image  # only whole blocks before the first patch token match


@pytest.mark.parametrize(
    ("images", "field", "needle"),
    [
        ([b"not an image at all"], "images", "image"),
        ([_png(64, 64, 1)[:40]], "images", "image"),
        ([_png(2100, 2000, 1)], "images.max_image_pixels", "4000000"),
        ([_png(40, 40, i) for i in range(9)], "images.max_images_per_request", "8"),
    ],
)
def test_bad_images_refused(
    setup: tuple[NativeEngine, InputProcessor], images: list[bytes], field: str, needle: str
) -> None:
    _, proc = setup
    with pytest.raises(InvalidRequestError, match=needle) as err:
        proc.build_chat("bad", _chat(len(images)), images)
    assert err.value.field == field


def test_placeholder_count_must_match(setup: tuple[NativeEngine, InputProcessor]) -> None:
    _, proc = setup
    with pytest.raises(InvalidRequestError, match="1 image placeholders but 2 images"):
        proc.build_chat("x", _chat(1), [_png(40, 40, 1), _png(40, 40, 2)])


def test_text_only_model_refuses_images(tiny_model: Path) -> None:
    cfg = NativeEngineConfig()
    spec = ModelSpec.from_pretrained_dir(tiny_model / "text-only")
    proc = InputProcessor.from_pretrained(tiny_model / "text-only", spec, cfg)
    with pytest.raises(InvalidRequestError, match="text-only"):
        proc.build_chat("x", _chat(1), [_png(40, 40, 1)])
