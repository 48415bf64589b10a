"""The Router deployment: the OpenAI-compatible HTTP ingress.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (liveness),
GET /ready (an engine replica answers), GET /openapi.json. Requests are parsed, validated and
tokenized here; engine replicas only ever see well-formed token ids and image bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.types import SamplingParams
from maverick_serve.serving.engine_client import EngineClient, HandleEngineClient
from maverick_serve.serving.errors import APIError, from_validation_error
from maverick_serve.serving.protocol import ChatCompletionRequest, CompletionRequest, EngineWorkItem
from maverick_serve.serving.request_builder import RequestBuilder

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"


class _Choice:
    """Accumulates one choice's deltas."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None


class RouterServer:
    def __init__(self, config: dict[str, Any], engine: Any, prefill: Any = None) -> None:
        self.config = ClusterConfig.model_validate(config)
        assert self.config.model.path is not None, "the builder resolves model.path"
        self.builder = RequestBuilder(Path(self.config.model.path), self.config)
        self.engine: EngineClient = engine if isinstance(engine, EngineClient) else HandleEngineClient(engine)
        self.prefill: EngineClient | None = None
        if prefill is not None:
            self.prefill = prefill if isinstance(prefill, EngineClient) else HandleEngineClient(prefill)
        self.model_name = self.config.model.served_model_name
        self.created = int(time.time())
        # Serve's proxy already echoes x-request-id (and injects one when the client sent none).
        self.echo_request_id = True

    # ---- ASGI app ---------------------------------------------------------------------------
    def __serve_build_asgi_app__(self) -> FastAPI:
        self.echo_request_id = False
        return self.build_api()

    def build_api(self) -> FastAPI:
        api = FastAPI(
            title="maverick-serve",
            version="0.1.0",
            description="OpenAI-compatible API for Llama 4 on Ray Serve",
        )
        chat_schema = {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
            }
        }
        comp_schema = {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}},
            }
        }

        @api.post("/v1/chat/completions", openapi_extra=chat_schema)
        async def chat(request: Request) -> Response:
            return await self._handle(request, ChatCompletionRequest)

        @api.post("/v1/completions", openapi_extra=comp_schema)
        async def completions(request: Request) -> Response:
            return await self._handle(request, CompletionRequest)

        @api.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "maverick-serve",
                    }
                ],
            }

        @api.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/ready")
        async def ready() -> Response:
            try:
                info = await asyncio.wait_for(self.engine.info(), timeout=5.0)
            except Exception as exc:
                return APIError(503, f"no engine replica answered: {exc!r}").response()
            return JSONResponse({"status": "ready", "engine": info})

        return api

    # ---- request handling -------------------------------------------------------------------
    async def _read_json(self, request: Request) -> Any:
        limit = self.config.router.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413, f"request body of {declared} bytes exceeds the {limit}-byte limit", code="body_too_large"
            )
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the {limit}-byte limit", code="body_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None

    async def _handle(
        self, request: Request, model: type[ChatCompletionRequest] | type[CompletionRequest]
    ) -> Response:
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        headers = {REQUEST_ID_HEADER: rid} if self.echo_request_id else {}
        try:
            payload = await self._read_json(request)
            try:
                req = model.model_validate(payload)
            except ValidationError as exc:
                raise from_validation_error(exc) from None
            sampling = self.builder.check_common(req)
            if isinstance(req, ChatCompletionRequest):
                prompt, images = await self.builder.chat_prompt(req)
            else:
                prompt, images = self.builder.completion_prompt(req), []
            items = self._work_items(rid, prompt, images, sampling, req.n)
            if self.prefill is not None and len(prompt) >= self.config.disaggregation.threshold_tokens:
                handed = await asyncio.wait_for(
                    self.prefill.prefill(items[0].model_dump()), self.config.router.request_timeout_s
                )
                if "error" in handed:
                    err = handed["error"]
                    raise APIError(err["status"], err["message"], _public_param(err.get("param"), req))
            streams = [self.engine.stream(item.model_dump()) for item in items]
            firsts = await asyncio.wait_for(
                asyncio.gather(*(_first_event(s) for s in streams)), self.config.router.request_timeout_s
            )
            for event in firsts:
                if "error" in event:
                    err = event["error"]
                    for s in streams:
                        await s.aclose()
                    raise APIError(err["status"], err["message"], _public_param(err.get("param"), req))
            kind = "chat" if isinstance(req, ChatCompletionRequest) else "completion"
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                body = self._sse(kind, rid, streams, firsts, include_usage)
                return StreamingResponse(body, media_type="text/event-stream", headers=headers)
            result = await asyncio.wait_for(
                self._collect(kind, rid, streams, firsts), self.config.router.request_timeout_s
            )
            return JSONResponse(result, headers=headers)
        except APIError as exc:
            return exc.response(headers)
        except TimeoutError:
            return APIError(
                504, f"request exceeded router.request_timeout_s={self.config.router.request_timeout_s}"
            ).response(headers)

    def _work_items(
        self, rid: str, prompt: list[int], images: list[bytes], sampling: SamplingParams, n: int
    ) -> list[EngineWorkItem]:
        items = []
        for i in range(n):
            s = sampling.model_copy()
            if s.seed is not None and i:
                s.seed = s.seed + i  # distinct but reproducible choices
            items.append(
                EngineWorkItem(
                    request_id=f"{rid}-{uuid.uuid4().hex[:8]}-{i}",
                    prompt_token_ids=prompt,
                    images=images,
                    sampling=s,
                )
            )
        return items

    def _apply(self, choice: _Choice, event: dict[str, Any]) -> None:
        choice.text.append(event["text_delta"])
        choice.token_ids.extend(event["new_token_ids"])
        for lp in event.get("logprobs") or []:
            choice.logprobs.append(lp)
        if event["finished"]:
            choice.finish_reason = event["finish_reason"]
            usage = event["usage"] or {}
            choice.usage = usage

    async def _collect(
        self,
        kind: str,
        rid: str,
        streams: list[AsyncGenerator[dict[str, Any], None]],
        firsts: list[dict[str, Any]],
    ) -> dict[str, Any]:
        async def drain(i: int) -> _Choice:
            choice = _Choice(i)
            self._apply(choice, firsts[i])
            if not firsts[i]["finished"]:
                async for event in streams[i]:
                    if "error" in event:
                        raise APIError(event["error"]["status"], event["error"]["message"])
                    self._apply(choice, event)
            return choice

        choices = await asyncio.gather(*(drain(i) for i in range(len(streams))))
        body = [
            self._choice_body(kind, c.index, "".join(c.text), c.logprobs, c.finish_reason) for c in choices
        ]
        return self._envelope(kind, rid, stream=False) | {"choices": body, "usage": _usage(choices)}

    def _envelope(self, kind: str, rid: str, stream: bool) -> dict[str, Any]:
        """The fields every chat/completion response or chunk starts with."""
        if kind == "chat":
            obj = "chat.completion.chunk" if stream else "chat.completion"
            return {
                "id": f"chatcmpl-{rid}",
                "object": obj,
                "created": int(time.time()),
                "model": self.model_name,
            }
        return {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }

    def _choice_body(
        self,
        kind: str,
        index: int,
        text: str,
        logprobs: list[dict[str, Any]] | None,
        finish_reason: str | None,
        delta: bool = False,
    ) -> dict[str, Any]:
        if kind == "chat":
            lp = self._chat_logprobs(logprobs) if logprobs else None
            content = {
                "delta" if delta else "message": {"content": text}
                if delta
                else {"role": "assistant", "content": text}
            }
            return {"index": index, **content, "logprobs": lp, "finish_reason": finish_reason}
        lp = self._completion_logprobs(logprobs) if logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    async def _sse(
        self,
        kind: str,
        rid: str,
        streams: list[AsyncGenerator[dict[str, Any], None]],
        firsts: list[dict[str, Any]],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        head = self._envelope(kind, rid, stream=True)
        queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            await queue.put((i, firsts[i]))
            if not firsts[i]["finished"]:
                async for event in streams[i]:
                    await queue.put((i, event))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        choices = [_Choice(i) for i in range(len(streams))]
        try:
            if kind == "chat":
                for i in range(len(streams)):
                    role = {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield _sse_data(head | {"choices": [role]})
            done = 0
            while done < len(streams):
                i, event = await queue.get()
                if event is None:
                    done += 1
                    continue
                if "error" in event:
                    yield _sse_data(APIError(event["error"]["status"], event["error"]["message"]).body())
                    break
                self._apply(choices[i], event)
                finish = event["finish_reason"] if event["finished"] else None
                body = self._choice_body(
                    kind, i, event["text_delta"], event.get("logprobs"), finish, delta=True
                )
                yield _sse_data(head | {"choices": [body]})
            if include_usage:
                yield _sse_data(head | {"choices": [], "usage": _usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                await s.aclose()  # aborts engine requests of a client that went away

    # ---- logprobs formats -------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.builder.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, lps: list[dict[str, Any]]) -> dict[str, Any]:
        content = []
        for lp in lps:
            tok = self._token_text(lp["token_id"])
            content.append(
                {
                    "token": tok,
                    "logprob": lp["logprob"],
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": (t := self._token_text(i)), "logprob": v, "bytes": list(t.encode())}
                        for i, v in lp["top"]
                    ],
                }
            )
        return {"content": content}

    def _completion_logprobs(self, lps: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = [self._token_text(lp["token_id"]) for lp in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{self._token_text(i): v for i, v in lp["top"]} for lp in lps],
            "text_offset": offsets,
        }


async def _first_event(stream: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return {"error": {"status": 503, "message": "engine replica closed the stream", "param": None}}


def _public_param(field: str | None, req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """Engine field names → the OpenAI request field a client would fix."""
    if field is None or not isinstance(req, ChatCompletionRequest):
        return field
    if field == "max_tokens" and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return {"prompt": "messages", "images": "messages"}.get(field.split(".")[0], field)


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    prompt = max((c.usage or {}).get("prompt_tokens", 0) for c in choices)
    completion = sum((c.usage or {}).get("completion_tokens", 0) for c in choices)
    cached = max((c.usage or {}).get("cached_tokens", 0) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse_data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
