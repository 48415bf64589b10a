"""Llama 4 image preprocessing: token counts, HF parity, tile order, and hostile inputs."""

from __future__ import annotations

import ast
import io
import math
import random
import struct
import zlib
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from maverick_serve.model import image_processing as ip
from maverick_serve.model.image_processing import (
    ImageInputError,
    ImageProcessingConfig,
    best_fit_grid,
    check_image_count,
    count_image_tokens,
    decode_image,
    image_prompt_token_ids,
    preprocess_image,
)
from maverick_serve.model.tokenizer_builder import SpecialTokenIds, build_tokenizer

CFG = ImageProcessingConfig()
REAL = SpecialTokenIds.for_base_vocab(200000)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed-looking PNG that declares a huge canvas (decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    assert CFG.tokens_per_tile == 144  # (336 / 14)² = 576 patches, / 4 by pixel shuffle 0.5
    assert ImageProcessingConfig(tile_size=28, patch_size=14).tokens_per_tile == 1  # 2x2 patches / 4
    assert (CFG.max_tiles, CFG.max_images_per_request, CFG.image_mean) == (16, 8, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="extra"):
        ImageProcessingConfig(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ImageProcessingConfig(tile_size=30, patch_size=14)
    for name, field in ImageProcessingConfig.model_fields.items():
        assert field.description, name


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    ("height", "width", "grid", "total"),
    [
        # 1 tile: <|image_start|> <|image|> 144×<|patch|> <|image_end|> = 3 + 144 = 147
        (336, 336, (1, 1), 147),
        # 2x2 + global: start 1 + 4×144 (576) + x-seps 2×1 + y-seps 2 + <|image|> 1 + 144 + end 1 = 727
        (672, 672, (2, 2), 727),
        # 1x4 + global: 1 + 4×144 (576) + x-seps 1×3 + y-seps 1 + 1 + 144 + 1 = 727
        (336, 1344, (1, 4), 727),
        # 4x4 (16 tiles, the maximum) + global: 1 + 16×144 (2304) + x-seps 4×3 + y-seps 4 + 1 + 144 + 1 = 2467
        (1344, 1344, (4, 4), 2467),
        # far larger square: still capped at 16 tiles -> 2467
        (5000, 5000, (4, 4), 2467),
        # small image: never upscaled past one tile -> 147
        (100, 50, (1, 1), 147),
        # tall 2000x300: 6x1 + global: 1 + 6×144 (864) + x-seps 0 + y-seps 6 + 1 + 144 + 1 = 1017
        (2000, 300, (6, 1), 1017),
    ],
)
def test_token_count_table(height: int, width: int, grid: tuple[int, int], total: int) -> None:
    assert best_fit_grid(height, width, CFG) == grid
    assert count_image_tokens(height, width, CFG) == total
    ids = image_prompt_token_ids(grid, CFG.tokens_per_tile, REAL)
    assert len(ids) == total
    tiles = grid[0] * grid[1]
    assert ids.count(REAL.patch) == (tiles + (tiles > 1)) * 144
    assert ids[0] == REAL.image_start and ids[-1] == REAL.image_end
    assert ids.count(REAL.image) == 1
    assert ids.count(REAL.tile_y_separator) == (grid[0] if tiles > 1 else 0)
    assert ids.count(REAL.tile_x_separator) == (grid[0] * (grid[1] - 1) if tiles > 1 else 0)


def test_prompt_layout_2x2() -> None:
    ids = image_prompt_token_ids((2, 2), 2, REAL)
    p, x, y = REAL.patch, REAL.tile_x_separator, REAL.tile_y_separator
    assert ids == [REAL.image_start, p, p, x, p, p, y, p, p, x, p, p, y, REAL.image, p, p, REAL.image_end]


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4), (16, 1)])
def test_prompt_tokens_match_transformers_prompt_split_image(grid: tuple[int, int]) -> None:
    """Tokenise HF's own `_prompt_split_image` string with our tiny tokenizer and compare."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    text = Llama4Processor._prompt_split_image(None, grid, 3)  # type: ignore[arg-type]
    tok = build_tokenizer()
    expected = tok.encode(text, add_special_tokens=False).ids
    assert image_prompt_token_ids(grid, 3, SpecialTokenIds.for_base_vocab(1920)) == expected


@pytest.mark.parametrize(("height", "width"), [(336, 336), (672, 672), (336, 1344), (900, 1600), (3000, 200)])
def test_count_matches_prompt_and_preprocess(height: int, width: int) -> None:
    img = Image.new("RGB", (width, height), (10, 20, 30))
    processed = preprocess_image(img, CFG)
    ids = image_prompt_token_ids(processed.aspect_ratio, CFG.tokens_per_tile, REAL)
    assert count_image_tokens(height, width, CFG) == len(ids)
    assert processed.aspect_ratio == best_fit_grid(height, width, CFG)
    assert ids.count(REAL.patch) == processed.num_patch_tokens
    assert processed.pixel_values.shape[0] * 144 == processed.num_patch_tokens
    assert processed.image_size == (height, width)


# ---------------------------------------------------------------- HF reference (extracted source)

_HF_FILE = Path(str(transformers.__file__)).parent / "models" / "llama4" / "image_processing_llama4.py"


class _FakeTvF:
    """The three torchvision.transforms.v2.functional calls HF makes, from torchvision's source."""

    record: list[tuple[int, int]] | None = None

    @staticmethod
    def resize(
        image: torch.Tensor, size: Any, interpolation: Any = None, antialias: bool = True
    ) -> torch.Tensor:
        h, w = int(size[0]), int(size[1])
        if _FakeTvF.record is not None:
            _FakeTvF.record.append((h, w))
            return torch.zeros((*image.shape[:-2], h, w), dtype=image.dtype)
        if (h, w) == tuple(image.shape[-2:]):
            return image
        native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        acceptable = [torch.float32, torch.float64] + ([torch.uint8] if native else [])
        need_cast = image.dtype not in acceptable
        x = image.to(torch.float32) if need_cast else image
        x = F.interpolate(x, size=[h, w], mode="bilinear", align_corners=False, antialias=antialias)
        if need_cast:
            x = x.round_().to(image.dtype)
        return x

    @staticmethod
    def pad(images: torch.Tensor, padding: list[int], fill: Any = 0) -> torch.Tensor:
        left, top, right, bottom = (int(v) for v in padding)
        assert list(fill) == [0, 0, 0]
        return F.pad(images, (left, right, top, bottom), value=0)

    @staticmethod
    def normalize(image: torch.Tensor, mean: Any, std: Any, inplace: bool = False) -> torch.Tensor:
        mean_t = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        image = image.sub_(mean_t) if inplace else image.sub(mean_t)
        return image.div_(std_t)


@lru_cache(maxsize=1)
def _hf() -> SimpleNamespace:
    """HF's Llama 4 image functions, exec'd from its source without the torchvision import."""
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_transforms import group_images_by_shape, reorder_images, split_to_tiles
    from transformers.image_utils import SizeDict
    from transformers.utils import TensorType

    tree = ast.parse(_HF_FILE.read_text())
    wanted_funcs = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions"}
    wanted_funcs |= {"get_best_fit", "pad_to_best_fit"}
    wanted_methods = {"_preprocess", "rescale_and_normalize"}
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted_funcs:
            if node.name != "find_supported_resolutions":
                node.decorator_list = []
            body.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "Llama4ImageProcessor":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in wanted_methods:
                    item.decorator_list = []
                    body.append(item)
    assert {n.name for n in body if isinstance(n, ast.FunctionDef)} == wanted_funcs | wanted_methods
    ns: dict[str, Any] = {
        "math": math,
        "torch": torch,
        "defaultdict": defaultdict,
        "lru_cache": lru_cache,
        "tvF": _FakeTvF,
        "SizeDict": SizeDict,
        "BatchFeature": BatchFeature,
        "TensorType": TensorType,
        "group_images_by_shape": group_images_by_shape,
        "reorder_images": reorder_images,
        "split_to_tiles": split_to_tiles,
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), str(_HF_FILE), "exec"), ns)

    class Proc:
        rescale_and_normalize = ns["rescale_and_normalize"]
        _preprocess = ns["_preprocess"]

        def resize(self, image: torch.Tensor, size: Any, resample: Any = None, antialias: bool = True) -> Any:
            return _FakeTvF.resize(image, (size.height, size.width), antialias=antialias)

        def normalize(self, image: torch.Tensor, mean: Any, std: Any, inplace: bool = False) -> Any:
            return _FakeTvF.normalize(image, mean, std, inplace=inplace)

    def preprocess(image_chw: torch.Tensor, max_patches: int = 16, resize_to_max_canvas: bool = False) -> Any:
        return Proc()._preprocess(
            [image_chw],
            do_resize=True,
            size=SizeDict(height=336, width=336),
            resample=None,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            max_patches=max_patches,
            resize_to_max_canvas=resize_to_max_canvas,
            disable_grouping=None,
            return_tensors=None,
        )

    return SimpleNamespace(ns=ns, SizeDict=SizeDict, preprocess=preprocess)


def _sizes(n: int, seed: int, hi: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    edge = [(1, 1), (1, 5000), (5000, 1), (335, 337), (337, 335), (336, 336), (673, 1345), (1000, 999)]
    return edge + [(rng.randint(1, hi), rng.randint(1, hi)) for _ in range(n)]


@pytest.mark.parametrize("max_tiles", [16, 4, 1])
@pytest.mark.parametrize("to_max", [False, True])
def test_best_fit_grid_matches_hf(max_tiles: int, to_max: bool) -> None:
    hf = _hf()
    cfg = ImageProcessingConfig(max_tiles=max_tiles, resize_to_max_canvas=to_max)
    size = hf.SizeDict(height=336, width=336)
    resolutions = torch.tensor(hf.ns["find_supported_resolutions"](max_tiles, size))
    assert [tuple(r) for r in resolutions.tolist()] == list(ip._supported_resolutions(max_tiles, 336))
    for h, w in _sizes(2000, seed=max_tiles, hi=6000):
        canvas = hf.ns["get_best_fit"]((h, w), resolutions, resize_to_max_canvas=to_max)
        assert best_fit_grid(h, w, cfg) == (int(canvas[0]) // 336, int(canvas[1]) // 336), (h, w)


@pytest.mark.parametrize("to_max", [False, True])
def test_resize_targets_match_hf(to_max: bool) -> None:
    """Run HF's real `_preprocess` with a recording resize: same resize sizes and grid."""
    hf = _hf()
    cfg = ImageProcessingConfig(resize_to_max_canvas=to_max)
    _FakeTvF.record = []
    try:
        for h, w in _sizes(80, seed=7, hi=2000):
            _FakeTvF.record.clear()
            out = hf.preprocess(torch.zeros((3, h, w), dtype=torch.uint8), resize_to_max_canvas=to_max)
            canvas = ip._best_fit_canvas(h, w, cfg)
            assert _FakeTvF.record[0] == ip._resize_target(h, w, canvas, cfg), (h, w)
            assert tuple(out["aspect_ratios"][0].tolist()) == best_fit_grid(h, w, cfg)
    finally:
        _FakeTvF.record = None


@pytest.mark.parametrize(("height", "width"), [(336, 336), (200, 150), (672, 1008), (500, 700), (1234, 345)])
def test_pixel_values_match_hf_pipeline(height: int, width: int) -> None:
    """Identical tensors to HF `_preprocess` (torchvision primitives substituted)."""
    rng = np.random.default_rng(height * 7919 + width)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    ours = preprocess_image(Image.fromarray(array), CFG)
    ref = _hf().preprocess(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    ref_pixels = ref["pixel_values"][0]
    assert ref_pixels.dtype == torch.bfloat16
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref_pixels.shape
    assert torch.equal(ours.pixel_values, ref_pixels.to(torch.float32))
    assert ours.aspect_ratio == tuple(ref["aspect_ratios"][0].tolist())


# ---------------------------------------------------------------- pixel invariants


def _norm(c: int) -> float:
    return (c / 255 - 0.5) / 0.5


def test_resize_close_to_pil_antialiased_bilinear() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(400, 500, 3), dtype=np.uint8)
    x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    for h, w in [(123, 337), (336, 336), (800, 900), (401, 77)]:
        ours = ip._resize_uint8(x, (h, w))[0].permute(1, 2, 0).numpy().astype(int)
        pil = np.asarray(Image.fromarray(array).resize((w, h), Image.Resampling.BILINEAR)).astype(int)
        assert ours.shape == pil.shape
        assert np.abs(ours - pil).max() <= 1, (h, w)


def test_solid_colour_and_padding() -> None:
    # 336 high x 500 wide -> canvas 336x672 (1x2), no resize, 172 zero columns on the right.
    img = Image.new("RGB", (500, 336), (255, 0, 128))
    p = preprocess_image(img, CFG)
    assert p.aspect_ratio == (1, 2)
    assert tuple(p.pixel_values.shape) == (3, 3, 336, 336)  # 2 tiles + global
    tile0, tile1, glob = p.pixel_values
    expected = torch.tensor([1.0, -1.0, _norm(128)]).view(3, 1, 1)
    assert torch.allclose(tile0, expected.expand(3, 336, 336), atol=1 / 128)
    assert torch.equal(tile0[0], torch.ones(336, 336)) and torch.equal(tile0[1], -torch.ones(336, 336))
    assert torch.allclose(tile1[:, :, :164], expected.expand(3, 336, 164), atol=1 / 128)
    assert torch.equal(tile1[:, :, 164:], -torch.ones(3, 336, 172))  # zero padding, normalised
    assert torch.allclose(glob, expected.expand(3, 336, 336), atol=1 / 128)


def test_padding_at_bottom() -> None:
    # 500 high x 336 wide -> canvas 672x336 (2x1): the second row tile is padded below.
    p = preprocess_image(Image.new("RGB", (336, 500), (255, 255, 255)), CFG)
    assert p.aspect_ratio == (2, 1)
    assert torch.equal(p.pixel_values[1, :, :164, :], torch.ones(3, 164, 336))
    assert torch.equal(p.pixel_values[1, :, 164:, :], -torch.ones(3, 172, 336))


def test_tile_order_row_major_then_global() -> None:
    rows, cols = 2, 3
    colours = [(40 * i, 255 - 40 * i, (97 * i) % 256) for i in range(rows * cols)]
    img = Image.new("RGB", (cols * 336, rows * 336))
    for i, colour in enumerate(colours):
        r, c = divmod(i, cols)
        img.paste(colour, (c * 336, r * 336, (c + 1) * 336, (r + 1) * 336))
    p = preprocess_image(img, CFG)
    assert p.aspect_ratio == (rows, cols)
    assert p.pixel_values.shape[0] == rows * cols + 1
    for i, colour in enumerate(colours):
        expected = torch.tensor([_norm(v) for v in colour]).view(3, 1, 1).expand(3, 336, 336)
        assert torch.allclose(p.pixel_values[i], expected, atol=1 / 128), i
    # Global tile: the whole picture squeezed into 336x336; the centres of its 2x3 cells keep the colours.
    glob = p.pixel_values[-1]
    for i, colour in enumerate(colours):
        r, c = divmod(i, cols)
        y, x = int((r + 0.5) * 336 / rows), int((c + 0.5) * 336 / cols)
        got = glob[:, y, x]
        assert torch.allclose(got, torch.tensor([_norm(v) for v in colour]), atol=1 / 64), i


def test_tiny_model_config() -> None:
    cfg = ImageProcessingConfig(tile_size=28, patch_size=14, max_tiles=4)
    p = preprocess_image(Image.new("RGB", (56, 56), (0, 0, 0)), cfg)
    assert p.aspect_ratio == (2, 2)
    assert tuple(p.pixel_values.shape) == (5, 3, 28, 28)
    assert p.num_patch_tokens == 5  # 5 tiles x 1 token
    # start + 4 tiles x 1 patch + 2 x-seps + 2 y-seps + <|image|> + 1 global patch + end = 12
    assert count_image_tokens(56, 56, cfg) == 12


# ---------------------------------------------------------------- decoding and limits


def test_decode_rgba_composited_on_white_and_hash_stable() -> None:
    img = Image.new("RGBA", (4, 3), (10, 20, 30, 255))
    img.putpixel((0, 0), (200, 100, 50, 0))  # fully transparent -> white
    img.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> ~grey
    decoded = decode_image(_png(img), CFG)
    assert decoded.mode == "RGB" and decoded.size == (4, 3)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (127, 127, 127)
    assert decoded.getpixel((2, 2)) == (10, 20, 30)
    # Same pixels, different encodings -> same content hash; one pixel changed -> different.
    bmp = io.BytesIO()
    decoded.save(bmp, format="BMP")
    h_png = ip.pixel_content_hash(decoded)
    assert ip.pixel_content_hash(decode_image(bmp.getvalue(), CFG)) == h_png
    assert preprocess_image(decoded, CFG).content_hash == h_png
    assert len(h_png) == 64 and int(h_png, 16) >= 0
    decoded.putpixel((3, 2), (10, 20, 31))
    assert ip.pixel_content_hash(decoded) != h_png


def test_decode_grayscale_palette_and_exif_orientation() -> None:
    gray = decode_image(_png(Image.new("L", (5, 2), 77)), CFG)
    assert gray.mode == "RGB" and gray.getpixel((4, 1)) == (77, 77, 77)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0  # palette index 0 transparent -> white
    decoded = decode_image(_png(pal), CFG)
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((1, 1)) == (0, 255, 0)
    # EXIF orientation 6 (rotate 90° clockwise) swaps width and height.
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (0, 0, 255)).save(jpeg, format="JPEG", exif=exif.tobytes())
    assert decode_image(jpeg.getvalue(), CFG).size == (20, 40)


def _assert_rejected(exc: pytest.ExceptionInfo[ImageInputError], field: str, limit: int | None) -> None:
    assert exc.value.field == field
    assert exc.value.limit == limit
    assert field in str(exc.value)
    if limit is not None:
        assert f"{field}={limit}" in str(exc.value)


def test_truncated_png_rejected() -> None:
    rng = np.random.default_rng(1)
    data = _png(Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageInputError) as exc:
        decode_image(data[: len(data) // 2], CFG)
    _assert_rejected(exc, "image", None)


@pytest.mark.parametrize(
    "data",
    [b"", bytes(random.Random(5).getrandbits(8) for _ in range(2048)), b"\x89PNG\r\n\x1a\n" + b"\x00" * 30],
)
def test_garbage_rejected(data: bytes) -> None:
    with pytest.raises(ImageInputError) as exc:
        decode_image(data, CFG)
    _assert_rejected(exc, "image", None)


def test_disallowed_format_rejected() -> None:
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(ImageInputError) as exc:
        decode_image(tiff.getvalue(), CFG)
    _assert_rejected(exc, "image", None)
    assert decode_image(tiff.getvalue(), ImageProcessingConfig(allowed_formats=("TIFF",))).size == (8, 8)


def test_over_byte_limit_rejected() -> None:
    data = _png(Image.new("RGB", (32, 32), (1, 2, 3)))
    cfg = ImageProcessingConfig(max_image_bytes=len(data) - 1)
    with pytest.raises(ImageInputError) as exc:
        decode_image(data, cfg)
    _assert_rejected(exc, "max_image_bytes", len(data) - 1)
    assert decode_image(data, ImageProcessingConfig(max_image_bytes=len(data))).size == (32, 32)


def test_over_pixel_limit_rejected_before_decode() -> None:
    bomb = _png_header_only(5000, 5000)  # 25 Mpx declared in < 100 bytes
    assert len(bomb) < 100
    cfg = ImageProcessingConfig(max_image_pixels=1_000_000)
    with pytest.raises(ImageInputError) as exc:
        decode_image(bomb, cfg)
    _assert_rejected(exc, "max_image_pixels", 1_000_000)
    assert "5000x5000" in str(exc.value)
    # A canvas beyond PIL's own bomb threshold is refused the same way with the default limit.
    with pytest.raises(ImageInputError) as exc:
        decode_image(_png_header_only(100_000, 100_000), CFG)
    _assert_rejected(exc, "max_image_pixels", 7680 * 4320)
    # Within the pixel limit the header-only file is simply corrupt.
    with pytest.raises(ImageInputError) as exc:
        decode_image(_png_header_only(5000, 5000), ImageProcessingConfig())
    _assert_rejected(exc, "image", None)


def test_too_many_images_rejected() -> None:
    check_image_count(8, CFG)
    with pytest.raises(ImageInputError) as exc:
        check_image_count(9, CFG)
    _assert_rejected(exc, "max_images_per_request", 8)
    assert "9 images" in str(exc.value)
