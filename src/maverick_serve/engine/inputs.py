"""Turn user-level inputs (chat messages or token ids, encoded images) into an `EngineRequest`.

This is the one place where the chat template is rendered, image bytes are decoded and tiled,
and each `<|image|>` placeholder of the rendered prompt is expanded to the image's full token
layout. The serving layer calls it before anything reaches an engine, so every bad input is
refused here with the field and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from maverick_serve.config.engine import EngineCommonConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.types import EngineRequest, ImageInput, InvalidRequestError, SamplingParams
from maverick_serve.model.image_processing import (
    ImageInputError,
    ImageProcessingConfig,
    ProcessedImage,
    check_image_count,
    decode_image,
    image_prompt_token_ids,
    preprocess_image,
)
from maverick_serve.model.tokenizer_builder import LLAMA4_CHAT_TEMPLATE, SpecialTokenIds, render_chat_prompt


def special_ids_from_tokenizer(tokenizer: Tokenizer) -> SpecialTokenIds:
    def tid(token: str) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {token} token; it is not a Llama 4 tokenizer")
        return int(i)

    return SpecialTokenIds(
        bos=tid("<|begin_of_text|>"),
        eos=(tid("<|end_of_text|>"), tid("<|eom|>"), tid("<|eot|>")),
        pad=tid("<|finetune_right_pad|>"),
        eot=tid("<|eot|>"),
        header_start=tid("<|header_start|>"),
        header_end=tid("<|header_end|>"),
        image_start=tid("<|image_start|>"),
        image_end=tid("<|image_end|>"),
        image=tid("<|image|>"),
        patch=tid("<|patch|>"),
        tile_x_separator=tid("<|tile_x_separator|>"),
        tile_y_separator=tid("<|tile_y_separator|>"),
    )


def image_config(spec: ModelSpec, cfg: EngineCommonConfig) -> ImageProcessingConfig:
    vision = spec.vision
    geometry: dict[str, Any] = {}
    if vision is not None:
        geometry = {
            "tile_size": vision.image_size,
            "patch_size": vision.patch_size,
            "pixel_shuffle_ratio": vision.pixel_shuffle_ratio,
        }
    return ImageProcessingConfig(
        **geometry,
        max_image_bytes=cfg.max_image_bytes,
        max_image_pixels=cfg.max_image_pixels,
        max_images_per_request=cfg.max_images_per_request,
    )


class InputProcessor:
    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        config: EngineCommonConfig,
        chat_template: str = LLAMA4_CHAT_TEMPLATE,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.special = special_ids_from_tokenizer(tokenizer)
        self.image_cfg = image_config(spec, config)
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, model_dir: Path, spec: ModelSpec, config: EngineCommonConfig) -> InputProcessor:
        import json

        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        template = LLAMA4_CHAT_TEMPLATE
        tok_cfg = Path(model_dir) / "tokenizer_config.json"
        if tok_cfg.is_file():
            template = json.loads(tok_cfg.read_text()).get("chat_template") or template
        return cls(spec, tokenizer, config, template)

    def process_images(self, images: list[bytes]) -> list[ProcessedImage]:
        if images and not self.spec.is_multimodal:
            raise InvalidRequestError(
                "images", "this model is text-only (Llama4ForCausalLM) and takes no images", 0
            )
        try:
            check_image_count(len(images), self.image_cfg)
            return [preprocess_image(decode_image(data, self.image_cfg), self.image_cfg) for data in images]
        except ImageInputError as exc:
            raise InvalidRequestError(
                f"images.{exc.field}" if exc.field != "image" else "images", str(exc), exc.limit
            ) from exc

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        text = render_chat_prompt(
            messages, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def expand_images(self, token_ids: list[int], images: list[ProcessedImage]) -> list[int]:
        """Replace the i-th `<|image|>` placeholder with image i's tiles, separators and patches."""
        placeholders = sum(t == self.special.image for t in token_ids)
        if placeholders != len(images):
            raise InvalidRequestError(
                "images",
                f"the prompt has {placeholders} image placeholders but {len(images)} images were given",
            )
        out: list[int] = []
        it = iter(images)
        for t in token_ids:
            if t == self.special.image:
                img = next(it)
                out.extend(
                    image_prompt_token_ids(img.aspect_ratio, self.image_cfg.tokens_per_tile, self.special)
                )
            else:
                out.append(t)
        return out

    def build(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        images: list[bytes] | None = None,
        sampling: SamplingParams | None = None,
    ) -> EngineRequest:
        processed = self.process_images(images or [])
        ids = self.expand_images(prompt_token_ids, processed) if processed else list(prompt_token_ids)
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=sampling or SamplingParams(),
            images=[ImageInput(p.pixel_values, p.num_patch_tokens, p.content_hash) for p in processed],
        )

    def build_chat(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        images: list[bytes] | None = None,
        sampling: SamplingParams | None = None,
    ) -> EngineRequest:
        return self.build(request_id, self.render_chat(messages), images, sampling)
