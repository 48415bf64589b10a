"""The /openapi.json document: OpenAPI 3.1, every schema under components, every error documented.

Written out rather than left to FastAPI because the routes read their bodies themselves (size
limit before parsing, our 400s instead of FastAPI's 422): FastAPI would document no body and no
error. The limits a request is checked against at runtime (n, logprobs, the vocabulary, the one
model served) go into the schemas, so a schema-driven client or fuzzer generates what we accept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from maverick_serve.api import responses
from maverick_serve.api.protocol import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"
_ERRORS: dict[int, str] = {
    400: "Invalid request: the message names the field and the limit.",
    401: "Missing or unknown API key (when router.auth is enabled).",
    404: "Unknown model.",
    413: "Request body larger than router.max_body_bytes.",
    429: "No replica can finish the request within its deadline, or the key's rate limit is spent; "
    "retry after Retry-After seconds.",
    502: "An engine replica failed and the request could not be retried.",
    503: "No engine replica is available.",
    504: "The request exceeded router.request_timeout_s.",
}
_GENERATION_ERRORS = (400, 401, 404, 413, 429, 502, 503, 504)


@dataclass(frozen=True)
class ApiLimits:
    """Runtime limits a request is checked against, stated in the schemas."""

    model_name: str
    max_n: int
    max_logprobs: int
    vocab_size: int


def _schemas(limits: ApiLimits) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (ChatCompletionRequest, "validation"),
        (CompletionRequest, "validation"),
    ]
    models += [
        (m, "serialization")
        for m in (
            responses.ErrorResponse,
            responses.ChatCompletion,
            responses.ChatCompletionChunk,
            responses.Completion,
            responses.CompletionChunk,
            responses.ModelList,
            responses.Health,
            responses.Ready,
        )
    ]
    _, top = models_json_schema(models, ref_template=REF)
    defs: dict[str, Any] = copy.deepcopy(top["$defs"])
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = defs[name]["properties"]
        props["model"] = {"type": "string", "enum": [limits.model_name], "title": "Model"}
        props["n"]["maximum"] = limits.max_n
        props["stop_token_ids"]["anyOf"][0]["items"]["maximum"] = limits.vocab_size - 1
        for penalty in ("presence_penalty", "frequency_penalty"):
            props[penalty] |= {"minimum": 0, "maximum": 0, "description": "Only 0 is supported."}
    chat, comp = defs["ChatCompletionRequest"]["properties"], defs["CompletionRequest"]["properties"]
    chat["top_logprobs"]["anyOf"][0]["maximum"] = limits.max_logprobs
    comp["logprobs"]["anyOf"][0]["maximum"] = limits.max_logprobs
    return defs


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def _errors(codes: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        entry: dict[str, Any] = {"description": _ERRORS[code], "content": _json("ErrorResponse")}
        if code == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds until a replica is predicted to have room.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        out[str(code)] = entry
    return out


def _events(chunk: str) -> dict[str, Any]:
    """One server-sent event (OpenAPI before 3.2: `schema` describes each event): its data is a
    JSON chunk, an error (the stream broke after its first token), or the closing `[DONE]`."""
    payload = {"anyOf": [{"$ref": REF.format(model=chunk)}, {"$ref": REF.format(model="ErrorResponse")}]}
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]
    }
    return {"schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}


def _generation(summary: str, request: str, answer: str, chunk: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{}, {"bearerAuth": []}],
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": f"The answer ({answer}), or with `stream: true` server-sent events, "
                    "one chunk per `data:` line, ending with `data: [DONE]`.",
                    "content": {**_json(answer), "text/event-stream": _events(chunk)},
                },
                **_errors(_GENERATION_ERRORS),
            },
        }
    }


def _get(summary: str, answer: str, codes: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": summary, "content": _json(answer)}, **_errors(codes)},
        }
    }


def openapi_document(limits: ApiLimits, version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maverick-serve",
            "version": version,
            "description": "OpenAI-compatible API for Llama 4 on Ray Serve.",
        },
        "paths": {
            "/v1/chat/completions": _generation(
                "Chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            ),
            "/v1/completions": _generation(
                "Text completion", "CompletionRequest", "Completion", "CompletionChunk"
            ),
            "/v1/models": _get("The served model", "ModelList"),
            "/health": _get("Liveness of this router replica", "Health"),
            "/ready": _get("An engine replica answers", "Ready", (503,)),
        },
        "components": {
            "schemas": _schemas(limits),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key."}
            },
        },
    }
