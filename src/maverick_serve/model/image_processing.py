"""Llama 4 image preprocessing and image prompt tokens, ported from transformers.

transformers' `Llama4ImageProcessor` needs torchvision, which cannot be imported next to the
CPU torch on our machines, so this is a port on PIL + torch that follows
`models/llama4/image_processing_llama4.py` and `processing_llama4.py` step by step:

1. RGB conversion as `image_transforms.convert_to_rgb` (alpha composited onto white).
2. Canvas choice: `find_supported_resolutions` + `get_best_fit`, computed with the same torch
   float32 arithmetic so ties and rounding agree, then the no-upscale clamp to one tile and
   `get_max_res_without_distortion` with HF's exact mix of Python and tensor arithmetic.
3. Resize of the uint8 image as torchvision's `resize_image` does it: bilinear,
   `antialias=True`, `align_corners=False`; natively in uint8 on AVX2/AVX512 CPUs, otherwise
   through float32 with rounding back to uint8 (torchvision picks the same way).
4. Zero padding at the bottom/right up to the canvas (uint8 zeros, i.e. -1 after normalising).
5. Rescale (1/255) and normalise in bfloat16 like `Llama4ImageProcessor.rescale_and_normalize`
   (HF's pixel_values are bfloat16); we return the same values as float32, which is lossless.
6. Split into tiles row-major, plus a global tile (the whole image resized to one tile,
   aspect ratio not preserved) when there is more than one tile.

Pixel-exact equality with HF cannot be tested here (torchvision is missing); the tests compare
the canvas/resize geometry against HF's own helper functions (extracted from its source) and
check the pixel path through invariants and against PIL's antialiased bilinear resize.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from maverick_serve.model.tokenizer_builder import SpecialTokenIds

RESCALE_FACTOR = 1 / 255
"""transformers' default `rescale_factor`, applied before normalisation."""


class ImageProcessingConfig(BaseModel):
    """Vision preprocessing settings and the request limits that protect the server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_size: int = Field(
        336, ge=1, description="Side of one square tile in pixels (336 for Scout/Maverick)."
    )
    max_tiles: int = Field(
        16, ge=1, description="Most tiles per image, excluding the global tile (HF `max_patches`)."
    )
    patch_size: int = Field(14, ge=1, description="Vision encoder patch side in pixels.")
    pixel_shuffle_ratio: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Pixel-shuffle ratio; one tile yields ratio² of its patches as tokens.",
    )
    resize_to_max_canvas: bool = Field(
        False, description="Upscale to the largest canvas (HF option); False never upscales beyond one tile."
    )
    image_mean: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5), description="Per-channel normalisation mean."
    )
    image_std: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5), description="Per-channel normalisation std."
    )
    resample: Literal["bilinear"] = Field(
        "bilinear", description="Resize filter; Llama 4 uses antialiased bilinear."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest accepted encoded image, in bytes."
    )
    max_image_pixels: int = Field(
        7680 * 4320,
        ge=1,
        description="Largest accepted decoded image, width*height (default 8K UHD); checked from the header.",
    )
    max_images_per_request: int = Field(8, ge=0, description="Most images accepted in one request.")
    allowed_formats: tuple[str, ...] = Field(
        ("PNG", "JPEG", "WEBP", "GIF", "BMP"),
        min_length=1,
        description="PIL format names tried when decoding; others are refused without being parsed.",
    )

    @model_validator(mode="after")
    def _check_geometry(self) -> ImageProcessingConfig:
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
        if self.image_std.count(0.0):
            raise ValueError("image_std must be non-zero")
        if self.tokens_per_tile < 1:
            raise ValueError("tile_size/patch_size/pixel_shuffle_ratio give no tokens per tile")
        return self

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens per tile, computed as Llama4Processor does (144 for real models)."""
        downsample = round(1.0 / self.pixel_shuffle_ratio**2)
        return (self.tile_size // self.patch_size) ** 2 // downsample


class ImageInputError(ValueError):
    """A client image was refused; `field` names the limit or input at fault, `limit` its value."""

    def __init__(self, field: str, limit: int | None, detail: str) -> None:
        self.field = field
        self.limit = limit
        where = field if limit is None else f"{field}={limit}"
        super().__init__(f"image rejected ({where}): {detail}")


def check_image_count(num_images: int, cfg: ImageProcessingConfig) -> None:
    """Refuse a request with more images than `max_images_per_request`."""
    if num_images > cfg.max_images_per_request:
        raise ImageInputError(
            "max_images_per_request",
            cfg.max_images_per_request,
            f"{num_images} images in one request",
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: transparency is composited onto white."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, cfg: ImageProcessingConfig) -> Image.Image:
    """Decode client bytes into an RGB image, enforcing the byte and pixel limits.

    The pixel limit is checked on the header size before any pixel data is decoded, so a
    small file declaring a huge canvas (a decompression bomb) costs nothing. EXIF orientation
    is applied, as transformers' `load_image` does.
    """
    if len(data) > cfg.max_image_bytes:
        raise ImageInputError("max_image_bytes", cfg.max_image_bytes, f"{len(data)} bytes")
    if not data:
        raise ImageInputError("image", None, "empty image data")
    # Untrusted input: any decoder failure is the client's error, except running out of memory.
    try:
        # PIL refuses canvases over 2 x Image.MAX_IMAGE_PIXELS itself (mapped below) and only
        # warns between 1x and 2x; our own, usually lower, limit is checked right after.
        img = Image.open(io.BytesIO(data), formats=list(cfg.allowed_formats))
    except Image.DecompressionBombError as exc:
        raise ImageInputError("max_image_pixels", cfg.max_image_pixels, str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageInputError(
            "image", None, f"not a decodable image in an allowed format {list(cfg.allowed_formats)}: {exc}"
        ) from exc
    width, height = img.size
    if width * height > cfg.max_image_pixels:
        img.close()
        raise ImageInputError(
            "max_image_pixels", cfg.max_image_pixels, f"{width}x{height} = {width * height} pixels"
        )
    try:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:
        raise ImageInputError("max_image_pixels", cfg.max_image_pixels, str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageInputError("image", None, f"corrupt or truncated image data: {exc}") from exc


# --- canvas selection: ports of transformers.models.llama4.image_processing_llama4 helpers ---


def _get_factors(dividend: int) -> set[int]:
    factors = set()
    for i in range(1, int(dividend**0.5) + 1):
        if dividend % i == 0:
            factors.add(i)
            factors.add(dividend // i)
    return factors


@lru_cache(maxsize=16)
def _supported_resolutions(max_tiles: int, tile_size: int) -> tuple[tuple[int, int], ...]:
    """HF `find_supported_resolutions`, same order (the order decides area ties)."""
    by_ratio: defaultdict[float, list[tuple[int, int]]] = defaultdict(list)
    for chunks in range(max_tiles, 0, -1):
        for factor in sorted(_get_factors(chunks)):
            h, w = factor, chunks // factor
            by_ratio[h / w].append((h, w))
    return tuple((h * tile_size, w * tile_size) for group in by_ratio.values() for h, w in group)


def _best_fit_canvas(height: int, width: int, cfg: ImageProcessingConfig) -> torch.Tensor:
    """HF `get_best_fit`, in the same torch float32 arithmetic; returns an int64 [h, w]."""
    resolutions = torch.tensor(_supported_resolutions(cfg.max_tiles, cfg.tile_size))
    target_heights, target_widths = resolutions[:, 0], resolutions[:, 1]
    scale_w = target_widths / width
    scale_h = target_heights / height
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    upscaling = scales[scales >= 1]
    if len(upscaling) > 0:
        selected = torch.max(upscaling) if cfg.resize_to_max_canvas else torch.min(upscaling)
    else:
        selected = torch.max(scales[scales < 1])
    chosen = resolutions[scales == selected]
    if len(chosen) > 1:
        return chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])]
    return chosen[0]


def best_fit_grid(height: int, width: int, cfg: ImageProcessingConfig) -> tuple[int, int]:
    """(rows, cols) of tiles HF picks for an image of this size (its `aspect_ratios` entry)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    canvas = _best_fit_canvas(height, width, cfg)
    return int(canvas[0]) // cfg.tile_size, int(canvas[1]) // cfg.tile_size


def _py_min(a: int | torch.Tensor, b: int | torch.Tensor) -> int | torch.Tensor:
    """Builtin `min(a, b)` (returns `a` on ties), spelled out so the operand types stay visible."""
    return b if bool(b < a) else a


def _resize_target(
    height: int, width: int, canvas: torch.Tensor, cfg: ImageProcessingConfig
) -> tuple[int, int]:
    """Size the image is resized to before padding, as HF `_preprocess` computes it.

    The expressions deliberately keep HF's types: `min(int, tensor)` yields whichever operand
    wins, and `get_max_res_without_distortion` then divides in float64 (ints) or float32
    (tensors), which can change the floor by one pixel.
    """
    target_h: int | torch.Tensor = canvas[0]
    target_w: int | torch.Tensor = canvas[1]
    if not cfg.resize_to_max_canvas:
        target_h = _py_min(max(height, cfg.tile_size), canvas[0])
        target_w = _py_min(max(width, cfg.tile_size), canvas[1])
    # get_max_res_without_distortion
    scale_w = target_w / width
    scale_h = target_h / height
    new_h: int | torch.Tensor
    new_w: int | torch.Tensor
    if scale_w < scale_h:
        new_w = target_w
        new_h = _py_min(math.floor(height * scale_w), target_h)
    else:
        new_h = target_h
        new_w = _py_min(math.floor(width * scale_h), target_w)
    return max(int(new_h), 1), max(int(new_w), 1)


# --- pixels ---


def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 natively on AVX2/AVX512 CPUs, through float32 elsewhere."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision `resize_image` for uint8 [N, C, H, W], bilinear with antialias."""
    if tuple(images.shape[-2:]) == size:
        return images
    if images.device.type == "cpu" and _native_uint8_bilinear():
        return F.interpolate(images, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(
        images.to(torch.float32), size=list(size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().to(torch.uint8)


def _rescale_and_normalize(images: torch.Tensor, cfg: ImageProcessingConfig) -> torch.Tensor:
    """Llama4ImageProcessor.rescale_and_normalize: bfloat16 rescale, then tvF.normalize."""
    x = images.to(dtype=torch.bfloat16) * RESCALE_FACTOR
    mean = torch.as_tensor(cfg.image_mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(cfg.image_std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub(mean).div_(std)


def _split_to_tiles(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[1, C, H, W] -> [rows*cols, C, H/rows, W/cols], row-major (transformers split_to_tiles)."""
    n, c, h, w = images.shape
    tiles = images.view(n, c, rows, h // rows, cols, w // cols).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(n * rows * cols, c, h // rows, w // cols)


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision encoder, with what the prompt and caches need."""

    pixel_values: torch.Tensor
    """[num_tiles (+1 global tile when num_tiles > 1), 3, tile, tile] float32, HF order."""
    aspect_ratio: tuple[int, int]
    """(rows, cols) of tiles."""
    num_patch_tokens: int
    """`<|patch|>` tokens in the prompt: tiles incl. the global one x tokens_per_tile."""
    content_hash: str
    """sha256 hex of the decoded RGB pixels and size: a cache key independent of encoding."""
    image_size: tuple[int, int]
    """(height, width) of the decoded, oriented image."""


def pixel_content_hash(img: Image.Image) -> str:
    """sha256 over the size and raw RGB bytes, so re-encodings of the same pixels share a key."""
    rgb = img if img.mode == "RGB" else _to_rgb(img)
    h = hashlib.sha256()
    h.update(f"rgb8:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def preprocess_image(img: Image.Image, cfg: ImageProcessingConfig) -> ProcessedImage:
    """Tile and normalise one image exactly as Llama4ImageProcessor (see module docstring)."""
    rgb = img if img.mode == "RGB" else _to_rgb(img)
    array = np.asarray(rgb, dtype=np.uint8)
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().unsqueeze(0)
    height, width = int(image.shape[-2]), int(image.shape[-1])

    canvas = _best_fit_canvas(height, width, cfg)
    canvas_h, canvas_w = int(canvas[0]), int(canvas[1])
    resized = _resize_uint8(image, _resize_target(height, width, canvas, cfg))
    padded = torch.zeros((1, 3, canvas_h, canvas_w), dtype=torch.uint8)
    padded[..., : resized.shape[-2], : resized.shape[-1]] = resized
    rows, cols = canvas_h // cfg.tile_size, canvas_w // cfg.tile_size
    tiles = _split_to_tiles(_rescale_and_normalize(padded, cfg), rows, cols)
    if rows * cols > 1:
        global_tile = _rescale_and_normalize(_resize_uint8(image, (cfg.tile_size, cfg.tile_size)), cfg)
        tiles = torch.cat([tiles, global_tile], dim=0)
    return ProcessedImage(
        pixel_values=tiles.to(torch.float32),
        aspect_ratio=(rows, cols),
        num_patch_tokens=int(tiles.shape[0]) * cfg.tokens_per_tile,
        content_hash=pixel_content_hash(rgb),
        image_size=(height, width),
    )


def image_prompt_token_ids(
    aspect_ratio: tuple[int, int], tokens_per_tile: int, special: SpecialTokenIds
) -> list[int]:
    """Token ids replacing one `<|image|>` placeholder: Llama4Processor._prompt_split_image."""
    rows, cols = aspect_ratio
    ids = [special.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids.extend([special.patch] * tokens_per_tile)
                if x < cols - 1:
                    ids.append(special.tile_x_separator)
            ids.append(special.tile_y_separator)
    ids.append(special.image)
    ids.extend([special.patch] * tokens_per_tile)
    ids.append(special.image_end)
    return ids


def count_image_tokens(height: int, width: int, cfg: ImageProcessingConfig) -> int:
    """Prompt tokens one image of this (oriented) size expands to, without decoding pixels."""
    rows, cols = best_fit_grid(height, width, cfg)
    tpt = cfg.tokens_per_tile
    # <|image_start|> + <|image|> + global/only tile patches + <|image_end|>
    total = 3 + tpt
    if rows * cols > 1:
        # tile patches, x separators between columns, one y separator per row
        total += rows * cols * tpt + rows * (cols - 1) + rows
    return total
