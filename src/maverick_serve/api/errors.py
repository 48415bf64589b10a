"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
    500: "internal_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **(headers or {})})


def _param(loc: tuple[int | str, ...]) -> str:
    """Drop pydantic's union-branch markers: `str`, `list[...]` and the part tag after a list index."""
    kept: list[int | str] = []
    for i, part in enumerate(loc):
        if part == "str" or (isinstance(part, str) and part.startswith("list[")):
            continue
        prev = loc[i - 2] if i >= 2 else None
        if isinstance(prev, str) and prev.startswith("list[") and isinstance(loc[i - 1], int):
            continue  # the discriminator tag of a content part
        kept.append(part)
    return ".".join(str(p) for p in kept)


def from_validation_error(exc: ValidationError) -> APIError:
    """The most specific pydantic error, its location as the OpenAI `param` (e.g. messages.0.content).

    A union (`content: str | list[part]`) reports one error per branch; the deepest one is the one
    a client needs (an unknown part type beats "not a string")."""
    errors = exc.errors()
    tagged = [e for e in errors if e["type"] == "union_tag_invalid"]
    err = tagged[0] if tagged else max(errors, key=lambda e: len(e["loc"]))
    loc = _param(err["loc"])
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return APIError(
            400,
            f"{loc}: unknown content part type {ctx.get('tag')!r}; expected one of "
            f"{ctx.get('expected_tags')}",
            loc,
            "invalid_type",
        )
    if err["type"] == "missing":
        return APIError(400, f"{loc} is required", loc, "missing_field")
    return APIError(400, f"{loc}: {err['msg']}", loc, "invalid_value")
