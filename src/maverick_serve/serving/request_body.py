"""Reading a request body within limits: size before and while reading, JSON nesting after parsing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

from starlette.requests import Request

from maverick_serve.api.errors import APIError


async def read_json_body(request: Request, max_bytes: int, max_depth: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(
            413,
            f"request body of {declared} bytes exceeds router.max_body_bytes={max_bytes}",
            code="body_too_large",
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise APIError(
                413, f"request body exceeds router.max_body_bytes={max_bytes}", code="body_too_large"
            )
    # Big bodies are parsed and checked off the event loop: other requests keep streaming.
    if len(body) > _INLINE_BYTES:
        return await asyncio.to_thread(_parse, bytes(body), max_depth)
    return _parse(bytes(body), max_depth)


_INLINE_BYTES = 256 * 1024


def _parse(body: bytes, max_depth: int) -> Any:
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # nested deeper than the C parser recurses, far past any limit
        raise _too_deep(max_depth) from None
    if nesting_exceeds(payload, max_depth):
        raise _too_deep(max_depth)
    return payload


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and a NaN temperature must not pass.
    raise ValueError(f"{name} is not a JSON value")


def _too_deep(limit: int) -> APIError:
    return APIError(
        400, f"request body nests deeper than router.max_json_depth={limit}", code="json_too_deep"
    )


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels. Depth-first over a stack of iterators,
    so memory is bounded by the depth, not by how many containers the body holds."""
    if not isinstance(value, dict | list):
        return False
    stack: list[Iterator[Any]] = [iter(value.values() if isinstance(value, dict) else value)]
    while stack:
        for child in stack[-1]:
            if isinstance(child, dict | list):
                if len(stack) >= limit:
                    return True
                stack.append(iter(child.values() if isinstance(child, dict) else child))
                break
        else:
            stack.pop()
    return False
