"""The checks every engine backend runs on a request before any compute, so bad input gets the
same 400 (naming the field and the limit) whichever backend serves it."""

from __future__ import annotations

from maverick_serve.config.engine import EngineCommonConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.types import EngineRequest, InvalidRequestError


def check_request(
    request: EngineRequest, spec: ModelSpec, limits: EngineCommonConfig, max_model_len: int
) -> int:
    """Raise `InvalidRequestError` for the first limit `request` breaks; return its max_tokens
    (what is left of the context when it sets none)."""
    t = spec.text
    prompt = request.prompt_token_ids
    if not prompt:
        raise InvalidRequestError("prompt", "the prompt is empty")
    bad = next((tok for tok in prompt if not 0 <= tok < t.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            "prompt", f"token id {bad} is outside the vocabulary (0..{t.vocab_size - 1})", t.vocab_size
        )
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(
            "prompt",
            f"the prompt has {len(prompt)} tokens; the context limit is {max_model_len} tokens "
            "including at least one generated token",
            max_model_len,
        )
    request.sampling.validate_against(limits.max_logprobs, t.vocab_size)
    room = max_model_len - len(prompt)
    max_tokens = request.sampling.max_tokens
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequestError(
            "max_tokens",
            f"max_tokens={max_tokens} exceeds the context left: {max_model_len} - {len(prompt)} "
            f"prompt tokens = {room}",
            room,
        )
    if len(request.images) > limits.max_images_per_request:
        raise InvalidRequestError(
            "images",
            f"{len(request.images)} images; at most {limits.max_images_per_request} per request",
            limits.max_images_per_request,
        )
    if request.images and not spec.is_multimodal:
        raise InvalidRequestError("images", "this model is text-only and cannot take images", 0)
    n_patch = sum(tok == spec.image_token_index for tok in prompt)
    n_feat = sum(img.num_patch_tokens for img in request.images)
    if n_patch != n_feat:
        raise InvalidRequestError(
            "images", f"the prompt has {n_patch} image patch tokens but the images provide {n_feat}"
        )
    return max_tokens if max_tokens is not None else room
