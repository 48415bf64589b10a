"""What crosses the socket pair between a replica and its engine process: one JSON object per
frame (no pickle: the replica decodes only plain data), a request's image tiles as raw frames
right behind it. Stamps are `time.monotonic()`, one clock for every process of a host."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from maverick_serve.engine.types import (
    EngineRequest,
    ImageInput,
    InvalidRequestError,
    RequestOutput,
    RequestTiming,
    SamplingParams,
    TokenLogprob,
    Usage,
)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(frame: bytes) -> dict[str, Any]:
    message = json.loads(frame)
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ValueError(f"engine process frame is not a typed message: {frame[:80]!r}")
    return message


def request_to_wire(request: EngineRequest) -> tuple[dict[str, Any], list[bytes]]:
    """The request's fields, and one raw frame per image (its tiles' bytes)."""
    images = [
        {
            "shape": list(img.pixel_values.shape),
            "dtype": str(img.pixel_values.dtype).removeprefix("torch."),
            "num_patch_tokens": img.num_patch_tokens,
            "content_hash": img.content_hash,
        }
        for img in request.images
    ]
    frames = [img.pixel_values.contiguous().view(torch.uint8).numpy().tobytes() for img in request.images]
    body = {
        "request_id": request.request_id,
        "prompt_token_ids": request.prompt_token_ids,
        "sampling": request.sampling.model_dump(),
        "images": images,
        "arrival_time": request.arrival_time,
        "record_steps": request.record_steps,
    }
    return body, frames


def request_from_wire(body: dict[str, Any], frames: list[bytes]) -> EngineRequest:
    images = []
    for meta, raw in zip(body["images"], frames, strict=True):
        dtype = getattr(torch, meta["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"image dtype {meta['dtype']!r} is not a torch dtype")
        pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(meta["shape"])
        images.append(ImageInput(pixels, int(meta["num_patch_tokens"]), str(meta["content_hash"])))
    return EngineRequest(
        request_id=str(body["request_id"]),
        prompt_token_ids=[int(t) for t in body["prompt_token_ids"]],
        sampling=SamplingParams.model_validate(body["sampling"]),
        images=images,
        arrival_time=float(body["arrival_time"]),
        record_steps=bool(body["record_steps"]),
    )


def output_to_wire(out: RequestOutput) -> dict[str, Any]:
    """The delta with its defaults left out: most are one token of one sequence."""
    wire: dict[str, Any] = {"id": out.request_id, "ids": out.new_token_ids, "text": out.text_delta}
    if out.finished:
        wire["finished"] = True
        wire["finish_reason"] = out.finish_reason
        wire["stop_reason"] = out.stop_reason
    if out.usage is not None:
        u = out.usage
        wire["usage"] = [u.prompt_tokens, u.completion_tokens, u.cached_tokens]
    if out.logprobs is not None:
        wire["logprobs"] = [[lp.token_id, lp.logprob, lp.top] for lp in out.logprobs]
    if out.timing is not None:
        wire["timing"] = dataclasses.asdict(out.timing)
    if out.tier_keys is not None:
        wire["tier_keys"] = out.tier_keys
    return wire


def output_from_wire(wire: dict[str, Any]) -> RequestOutput:
    usage = Usage(*wire["usage"]) if "usage" in wire else None
    logprobs = None
    if "logprobs" in wire:
        logprobs = [
            TokenLogprob(tid, lp, [(int(t), float(v)) for t, v in top]) for tid, lp, top in wire["logprobs"]
        ]
    timing = None
    if "timing" in wire:
        fields = dict(wire["timing"])
        fields["steps"] = [tuple(s) for s in fields.get("steps", [])]
        timing = RequestTiming(**fields)
    return RequestOutput(
        request_id=wire["id"],
        new_token_ids=wire["ids"],
        text_delta=wire["text"],
        finished=wire.get("finished", False),
        finish_reason=wire.get("finish_reason"),
        stop_reason=wire.get("stop_reason"),
        usage=usage,
        logprobs=logprobs,
        timing=timing,
        tier_keys=wire.get("tier_keys"),
    )


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, InvalidRequestError):
        return {"kind": "invalid", "field": exc.field, "message": str(exc), "limit": exc.limit}
    return {"kind": "failed", "message": f"{type(exc).__name__}: {exc}"}


def error_from_wire(wire: dict[str, Any]) -> Exception:
    """The engine process's refusal as the in-process engine raises it: bad input stays a 4xx."""
    if wire.get("kind") == "invalid":
        return InvalidRequestError(str(wire["field"]), str(wire["message"]), wire.get("limit"))
    return RuntimeError(f"engine process: {wire.get('message')}")
