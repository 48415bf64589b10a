"""Router side: OpenAI requests → token ids with image layouts + raw image bytes.

Everything a client can get wrong is checked here, before any engine sees the request: message
structure, image URL schemes, base64, image bytes and pixels, image count, sampling ranges.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jinja2
from tokenizers import Tokenizer

from maverick_serve.api.errors import APIError
from maverick_serve.api.protocol import ChatCompletionRequest, CompletionRequest, ImagePart
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.inputs import image_config, special_ids_from_tokenizer
from maverick_serve.engine.types import InvalidRequestError, SamplingParams
from maverick_serve.model.image_processing import (
    ImageInputError,
    best_fit_grid,
    decode_image,
    image_prompt_token_ids,
)
from maverick_serve.model.tokenizer_builder import LLAMA4_CHAT_TEMPLATE, render_chat_prompt

REMOTE_FETCH_TIMEOUT_S = 10.0
# Hub-style names (`org/model`, `llama-4-tiny`, `model:tag`); anything with `..`, a leading `/`,
# `~`, a backslash or a scheme is refused before it is compared with the served name.
MODEL_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._:-]{0,127})?")


class RequestBuilder:
    def __init__(self, model_dir: Path, config: ClusterConfig) -> None:
        self.config = config
        self.spec = ModelSpec.from_pretrained_dir(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.special = special_ids_from_tokenizer(self.tokenizer)
        self.image_cfg = image_config(self.spec, config.engine).model_copy(
            update={
                "max_image_bytes": config.router.max_image_bytes,
                "max_images_per_request": config.router.max_images_per_request,
            }
        )
        tok_cfg = model_dir / "tokenizer_config.json"
        template = json.loads(tok_cfg.read_text()).get("chat_template") if tok_cfg.is_file() else None
        self.chat_template = template or LLAMA4_CHAT_TEMPLATE

    # ---- sampling ---------------------------------------------------------------------------
    def check_common(self, req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        if req.model != self.config.model.served_model_name and not MODEL_NAME.fullmatch(req.model):
            # Never a path: some servers resolve unknown names on disk or the hub; we only compare.
            raise APIError(
                400,
                f"model: {req.model[:100]!r} is not a model name (letters, digits, '.', '_', ':', '-', "
                "at most one '/' between parts, at most 256 characters)",
                "model",
                "invalid_value",
            )
        if req.model != self.config.model.served_model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves "
                f"{self.config.model.served_model_name!r}",
                "model",
                "model_not_found",
            )
        if not 1 <= req.n <= self.config.router.max_n:
            raise APIError(400, f"n must be between 1 and {self.config.router.max_n}, got {req.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported (only 0)", name, "unsupported")
        sampling = req.sampling()
        budget = self.config.router.max_tokens_per_request
        if sampling.max_tokens is not None and req.n * sampling.max_tokens > budget:
            field = "max_tokens"
            if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
                field = "max_completion_tokens"
            raise APIError(
                400,
                f"n × {field} = {req.n} × {sampling.max_tokens} exceeds "
                f"router.max_tokens_per_request={budget}",
                field,
                "too_many_tokens",
            )
        try:
            sampling.validate_against(self.config.engine.max_logprobs, self.spec.text.vocab_size)
        except InvalidRequestError as exc:
            raise _field_error(
                exc, {"logprobs": "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"}
            ) from exc
        return sampling

    # ---- prompts ----------------------------------------------------------------------------
    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(
                    400,
                    f"prompt: batches of {len(prompt)} prompts are not supported; send one "
                    "prompt per request",
                    "prompt",
                )
            prompt = prompt[0]
        if req.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported")
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", "prompt")
            return self._encode(prompt, "prompt", add_special_tokens=True)
        ids = [int(t) for t in prompt]
        vocab = self.spec.text.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if not ids or bad is not None:
            raise APIError(
                400,
                f"prompt token ids must be non-empty and in 0..{vocab - 1}"
                + (f" (got {bad})" if bad is not None else ""),
                "prompt",
            )
        return ids

    async def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], list[bytes]]:
        if not req.messages:
            raise APIError(400, "messages must contain at least one message", "messages", "missing_field")
        messages: list[dict[str, Any]] = []
        urls: list[tuple[str, str]] = []
        for i, msg in enumerate(req.messages):
            if not msg.content or isinstance(msg.content, str):  # None, "" and [] are all empty
                messages.append({"role": msg.role, "content": msg.content or ""})
                continue
            parts: list[dict[str, str]] = []
            for j, part in enumerate(msg.content):
                if isinstance(part, ImagePart):
                    parts.append({"type": "image"})
                    urls.append((part.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
                else:
                    parts.append({"type": "text", "text": part.text})
            messages.append({"role": "system" if msg.role == "developer" else msg.role, "content": parts})
        limit = self.image_cfg.max_images_per_request
        if len(urls) > limit:
            raise APIError(
                400,
                f"{len(urls)} images in the request; at most {limit} are allowed",
                "messages",
                "too_many_images",
            )
        if urls and not self.spec.is_multimodal:
            raise APIError(400, "this model is text-only and takes no images", urls[0][1])
        images = [await self._image_bytes(url, param) for url, param in urls]
        aspect = [self._aspect_ratio(data, param) for data, (_, param) in zip(images, urls, strict=True)]
        try:
            text = render_chat_prompt(messages, add_generation_prompt=True, chat_template=self.chat_template)
        except jinja2.TemplateError as exc:  # the checkpoint's own template refused this conversation
            raise APIError(
                400, f"messages: the chat template cannot render them: {exc}"[:500], "messages"
            ) from None
        ids = self._encode(text, "messages", add_special_tokens=False)
        return self._expand(ids, aspect), images

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        except (TypeError, UnicodeEncodeError):  # JSON's \ud800 escapes decode to lone surrogates
            raise APIError(
                400, f"{param}: text is not valid Unicode (a lone surrogate escape such as \\ud800)", param
            ) from None

    def _expand(self, ids: list[int], aspects: list[tuple[int, int]]) -> list[int]:
        out: list[int] = []
        it = iter(aspects)
        for t in ids:
            if t == self.special.image:
                out.extend(image_prompt_token_ids(next(it), self.image_cfg.tokens_per_tile, self.special))
            else:
                out.append(t)
        return out

    # ---- images -----------------------------------------------------------------------------
    async def _image_bytes(self, url: str, param: str) -> bytes:
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise APIError(400, "image data URLs must be base64 (data:image/png;base64,...)", param)
            if len(payload) * 3 // 4 > self.image_cfg.max_image_bytes:
                raise APIError(
                    413,
                    f"image is larger than the {self.image_cfg.max_image_bytes}-byte limit",
                    param,
                    "image_too_large",
                )
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "image data URL is not valid base64", param, "invalid_image") from None
        if scheme in ("http", "https"):
            return await self._fetch_remote(url, param)
        raise APIError(
            400,
            f"image_url scheme {scheme or '(none)'!r} is not supported; send a data: URL",
            param,
            "invalid_image_url",
        )

    async def _fetch_remote(self, url: str, param: str) -> bytes:
        router = self.config.router
        host = urlparse(url).hostname or ""
        if not router.allow_remote_images:
            raise APIError(
                400,
                "remote image URLs are disabled on this server; send a data: URL "
                "(router.allow_remote_images)",
                param,
                "invalid_image_url",
            )
        if host not in router.remote_image_hosts:
            raise APIError(
                400, f"image host {host!r} is not in router.remote_image_hosts", param, "invalid_image_url"
            )
        import httpx

        limit = self.image_cfg.max_image_bytes
        async with httpx.AsyncClient(timeout=REMOTE_FETCH_TIMEOUT_S, follow_redirects=False) as client:
            try:
                async with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise APIError(400, f"fetching the image gave HTTP {resp.status_code}", param)
                    data = bytearray()
                    async for chunk in resp.aiter_bytes():
                        data.extend(chunk)
                        if len(data) > limit:
                            raise APIError(
                                413, f"image is larger than the {limit}-byte limit", param, "image_too_large"
                            )
                    return bytes(data)
            except httpx.HTTPError as exc:
                raise APIError(400, f"could not fetch the image: {exc}", param) from None

    def _aspect_ratio(self, data: bytes, param: str) -> tuple[int, int]:
        try:
            img = decode_image(data, self.image_cfg)
        except ImageInputError as exc:
            status = 413 if exc.field == "max_image_bytes" else 400
            raise APIError(status, str(exc), param, "invalid_image") from None
        return best_fit_grid(img.height, img.width, self.image_cfg)


def _field_error(exc: InvalidRequestError, rename: dict[str, str]) -> APIError:
    param = rename.get(exc.field, exc.field)
    return APIError(400, str(exc), param)
