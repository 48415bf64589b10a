"""The Router deployment: the OpenAI-compatible HTTP ingress.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (liveness),
GET /ready (an engine replica answers), GET /openapi.json. Requests are authenticated, parsed,
validated, tokenized and priced here; the `Dispatcher` picks the engine replica (policy,
backpressure, retries). Engine replicas only ever see well-formed token ids and image bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from maverick_serve import __version__
from maverick_serve.api.engine_client import EngineClient, HandleEngineClient
from maverick_serve.api.errors import APIError, from_validation_error
from maverick_serve.api.openapi import ApiLimits, openapi_document
from maverick_serve.api.protocol import ChatCompletionRequest, CompletionRequest, EngineWorkItem
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.types import SamplingParams
from maverick_serve.observability.tracing import RequestTrace, record_content, step
from maverick_serve.routing.auth import ApiKeyAuth
from maverick_serve.routing.dispatcher import Dispatcher, Opened
from maverick_serve.routing.metrics import RouterMetrics
from maverick_serve.routing.publisher import HandleStateChannel, StateChannel
from maverick_serve.serving.latency_window import RateWindow
from maverick_serve.serving.openai_format import (
    Choice,
    ResponseFormatter,
    merge_events,
    next_text_offset,
    sse_data,
    usage,
)
from maverick_serve.serving.replica_watch import ReplicaWatch
from maverick_serve.serving.request_body import read_json_body
from maverick_serve.serving.request_builder import RequestBuilder

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"


class RouterServer:
    def __init__(
        self,
        config: dict[str, Any],
        engine: Any,
        prefill: Any = None,
        hub: Any = None,
        prefill_deployment_name: str = "LlamaPrefill",
        engine_deployment_name: str = "LlamaEngine",
    ) -> None:
        self.config = ClusterConfig.model_validate(config)
        assert self.config.model.path is not None, "the builder resolves model.path"
        self.builder = RequestBuilder(Path(self.config.model.path), self.config)
        self.engine: EngineClient = engine if isinstance(engine, EngineClient) else HandleEngineClient(engine)
        self.prefill_tier: EngineClient | None = None
        if prefill is not None:
            self.prefill_tier = prefill if isinstance(prefill, EngineClient) else HandleEngineClient(prefill)
        a = self.config.autoscaling
        self.engine_replicas = ReplicaWatch(
            self.config.app_name, engine_deployment_name, always=not a.enabled
        )
        may_be_zero = a.enabled and a.prefill.min_replicas == 0
        self.prefill_live = ReplicaWatch(
            self.config.app_name, prefill_deployment_name, always=False, assume_up=not may_be_zero
        )
        # Long prompts' tokens admitted here lately: the prefill tier's load, with or without replicas.
        self.prefill_demand = RateWindow(a.signal_window_s)
        channel: StateChannel | None = None
        if hub is not None:
            channel = hub if isinstance(hub, StateChannel) else HandleStateChannel(hub)
        self.dispatcher = Dispatcher(
            self.config,
            self.builder.spec,
            self.engine,
            channel,
            self.builder.image_cfg,
            capacity_coming=self.engine_replicas.starting,
        )
        self.auth = ApiKeyAuth(self.config.router.auth)
        self.model_name = self.config.model.served_model_name
        self.format = ResponseFormatter(self.model_name, self.builder.tokenizer)
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
            version=__version__,
            description="OpenAI-compatible API for Llama 4 on Ray Serve",
        )
        limits = ApiLimits(
            self.model_name,
            self.config.router.max_n,
            self.config.engine.max_logprobs,
            self.builder.spec.text.vocab_size,
        )
        document = openapi_document(limits, __version__)
        api.openapi = lambda: document  # type: ignore[method-assign]  # FastAPI's documented override

        @api.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, ChatCompletionRequest)

        @api.post("/v1/completions")
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
    async def _handle(
        self, request: Request, model: type[ChatCompletionRequest] | type[CompletionRequest]
    ) -> Response:
        chat = model is ChatCompletionRequest
        answer = Answer(
            RequestTrace("chat" if chat else "text_completion", self.model_name, {}),
            "chat" if chat else "completions",
            time.monotonic(),
            self.dispatcher.metrics,
        )
        with answer.trace.activate():  # handle calls made meanwhile carry the trace to the engines
            response = await self._respond(request, model, answer)
        if (parent := answer.trace.traceparent()) is not None:
            response.headers["traceparent"] = parent
            # The client's tracestate belongs to its trace: returned when we continued that trace.
            state, incoming = request.headers.get("tracestate"), request.headers.get("traceparent", "")
            if state and incoming.split("-")[1:2] == parent.split("-")[1:2]:
                response.headers["tracestate"] = state
        if not answer.streaming:
            answer.done(response.status_code)
        return response

    async def _respond(
        self,
        request: Request,
        model: type[ChatCompletionRequest] | type[CompletionRequest],
        answer: Answer,
    ) -> Response:
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        answer.trace.set(**{"gen_ai.response.id": rid})
        headers = {REQUEST_ID_HEADER: rid} if self.echo_request_id else {}
        loop = asyncio.get_running_loop()
        timeout = self.config.router.request_timeout_s
        deadline = loop.time() + timeout
        opened: Opened | None = None
        handed_off = False
        try:
            with step("router.parse"):
                key = self.auth.authenticate(request.headers.get("authorization"))
                r = self.config.router
                payload = await read_json_body(request, r.max_body_bytes, r.max_json_depth)
                try:
                    req = model.model_validate(payload)
                except ValidationError as exc:
                    raise from_validation_error(exc) from None
                sampling = self.builder.check_common(req)
                self.dispatcher.refuse_early(sampling.max_tokens, req.n)
                if isinstance(req, ChatCompletionRequest):
                    prompt, images = await self.builder.chat_prompt(req)
                else:
                    prompt, images = self.builder.completion_prompt(req), []
            answer.describe(req, sampling, prompt, images)
            session = request.headers.get(self.config.router.routing.session_header) or req.user
            with step("router.price") as span:
                cost = self.dispatcher.price(prompt, images, session, sampling.max_tokens)
                span.set_attribute("maverick.route.image_tokens", cost.image_tokens)
            self.auth.admit(key, len(prompt) + (sampling.max_tokens or 0) * req.n)
            await self.dispatcher.start()
            self.engine_replicas.start()
            items = self._work_items(rid, prompt, images, sampling, req.n)
            if self.prefill_tier is not None and len(prompt) >= self.config.disaggregation.threshold_tokens:
                self.prefill_live.start()
                self.prefill_demand.add(len(prompt))
                if self.prefill_live.available():  # else the engine prefills it (tier at zero)
                    headers["x-maverick-prefill"] = await self._hand_off(items[0], req, deadline)
                else:
                    self.dispatcher.metrics.prefill_handoff("self")
                    headers["x-maverick-prefill"] = "self"
            with step("router.dispatch") as span:
                opened = await asyncio.wait_for(
                    self.dispatcher.open(items, cost, deadline), deadline - loop.time()
                )
                span.set_attributes(
                    {"maverick.replica": opened.replica or "", "maverick.retries": opened.retries}
                )
            for event in opened.firsts:
                if "error" in event:
                    err = event["error"]
                    raise APIError(err["status"], err["message"], _public_param(err.get("param"), req))
            if opened.replica:
                headers["x-maverick-replica"] = opened.replica
            headers["x-maverick-retries"] = str(opened.retries)
            kind = "chat" if isinstance(req, ChatCompletionRequest) else "completion"
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                body = self._sse(kind, rid, opened, include_usage, deadline, answer)
                handed_off = answer.streaming = True
                return StreamingResponse(body, media_type="text/event-stream", headers=headers)
            result = await asyncio.wait_for(self._collect(kind, rid, opened, answer), deadline - loop.time())
            return JSONResponse(result, headers=headers)
        except APIError as exc:
            if exc.status in (401, 429):
                self.dispatcher.metrics.rejection(exc.code or str(exc.status))
            return exc.response(headers)
        except TimeoutError:
            self.dispatcher.metrics.rejection("deadline")
            if opened is not None:
                _log_deadline(rid, opened)
            return APIError(
                504, f"request exceeded router.request_timeout_s={timeout}", None, "timeout"
            ).response(headers)
        finally:
            if opened is not None and not handed_off:
                await self._close(opened, None)

    async def _hand_off(self, item: EngineWorkItem, req: Any, deadline: float) -> str:
        """Prefill on the prefill tier; its KV lands in the tier for the decode replica. A prefill
        replica that fails (killed mid-hand-off, its engine dead) costs time, not the request:
        the decode replica then prefills the prompt itself, as with the tier at zero replicas.
        Returns the outcome (ok | fallback), which the response's x-maverick-prefill header carries."""
        assert self.prefill_tier is not None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        with step("prefill.handoff", **{"gen_ai.usage.input_tokens": len(item.prompt_token_ids)}):
            try:
                handed = await asyncio.wait_for(
                    self.prefill_tier.prefill(item.model_dump()), deadline - loop.time()
                )
            except (TimeoutError, asyncio.CancelledError):  # the deadline, or the client left
                self.dispatcher.metrics.prefill_handoff("error")
                raise
            except Exception as exc:
                handed = {"error": {"status": 503, "message": f"prefill replica failed: {exc!r}"}}
            if "error" in handed:
                err = handed["error"]
                if int(err["status"]) < 500:  # the request itself is at fault: no retry helps
                    self.dispatcher.metrics.prefill_handoff("error")
                    raise APIError(err["status"], err["message"], _public_param(err.get("param"), req))
                logger.warning(
                    "prefill hand-off failed, the decode replica prefills: %s", err["message"][:300]
                )
                self.dispatcher.metrics.prefill_handoff("fallback")
                return "fallback"
        self.dispatcher.metrics.prefill_handoff("ok", time.monotonic() - started)
        return "ok"

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the router and prefill tiers' policies read (Serve calls this on every push)."""
        return {"prefill_tokens_per_s": self.prefill_demand.per_s()}

    async def _close(self, opened: Opened, choices: list[Choice] | None) -> None:
        """Close every stream (aborts engine requests still running) and settle accounting."""
        for s in opened.streams:
            with contextlib.suppress(Exception):
                await s.aclose()
        self.dispatcher.finished(opened, usage(choices)["prompt_tokens_details"] if choices else None)

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

    async def _collect(self, kind: str, rid: str, opened: Opened, answer: Answer) -> dict[str, Any]:
        async def drain(i: int) -> Choice:
            choice = Choice(i)
            choice.apply(opened.firsts[i])
            if not opened.firsts[i]["finished"]:
                try:
                    async for event in opened.streams[i]:
                        if "error" in event:
                            raise APIError(event["error"]["status"], event["error"]["message"])
                        choice.apply(event)
                except APIError:
                    raise
                except Exception as exc:  # the replica died after the first token
                    raise APIError(502, f"engine replica failed mid-generation: {exc!r}"[:500]) from exc
            return choice

        choices = list(await asyncio.gather(*(drain(i) for i in range(len(opened.streams)))))
        self.dispatcher.finished(opened, usage(choices)["prompt_tokens_details"])
        answer.finish(choices)
        body = [
            self.format.choice_body(kind, c.index, "".join(c.text), c.logprobs, c.finish_reason)
            for c in choices
        ]
        return self.format.envelope(kind, rid, stream=False) | {"choices": body, "usage": usage(choices)}

    async def _sse(
        self, kind: str, rid: str, opened: Opened, include_usage: bool, deadline: float, answer: Answer
    ) -> AsyncIterator[str]:
        head = self.format.envelope(kind, rid, stream=True)
        queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()
        n = len(opened.streams)

        async def pump(i: int) -> None:
            await queue.put((i, opened.firsts[i]))
            try:
                if not opened.firsts[i]["finished"]:
                    async for event in opened.streams[i]:
                        await queue.put((i, event))
            except Exception as exc:  # the replica died after the first token: say so, never hang
                message = f"engine replica failed mid-generation: {exc!r}"[:500]
                await queue.put((i, {"error": {"status": 502, "message": message}}))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        choices = [Choice(i) for i in range(n)]
        offsets = [0] * n  # each completion choice's text_offset so far
        loop = asyncio.get_running_loop()
        status = 200
        try:
            if kind == "chat":
                for i in range(n):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield sse_data(head | {"choices": [role | {"finish_reason": None}]})
            done = 0
            held: tuple[int, dict[str, Any] | None] | None = None
            while done < n:
                try:
                    if held is not None:
                        (i, event), held = held, None
                    else:
                        i, event = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                    # Events of this choice that are already queued go out as one chunk.
                    while event is not None and "error" not in event and not queue.empty():
                        j, later = queue.get_nowait()
                        if j != i or later is None or "error" in later:
                            held = (j, later)
                            break
                        event = merge_events(event, later)
                except TimeoutError:
                    self.dispatcher.metrics.rejection("deadline")
                    _log_deadline(rid, opened)
                    limit = self.config.router.request_timeout_s
                    status = 504
                    yield sse_data(APIError(504, f"request exceeded router.request_timeout_s={limit}").body())
                    break
                if event is None:
                    done += 1
                    continue
                if "error" in event:
                    status = int(event["error"]["status"])
                    yield sse_data(APIError(event["error"]["status"], event["error"]["message"]).body())
                    break
                answer.first_token()
                choices[i].apply(event)
                finish = event["finish_reason"] if event["finished"] else None
                body = self.format.choice_body(
                    kind,
                    i,
                    event["text_delta"],
                    event.get("logprobs"),
                    finish,
                    delta=True,
                    text_offset=offsets[i],
                )
                offsets[i] = next_text_offset(body, offsets[i])
                yield sse_data(head | {"choices": [body]})
            if include_usage:
                yield sse_data(head | {"choices": [], "usage": usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            await self._close(opened, choices)
            answer.finish(choices)
            # A stream cut mid-way (client gone) counts as 499, the de-facto code for it.
            answer.done(status if done == n or status != 200 else 499)


class Answer:
    """One API request's trace span and router metrics, settled once when the answer is complete
    (the handler's return, or a stream's last byte)."""

    def __init__(self, trace: RequestTrace, route: str, started: float, metrics: RouterMetrics) -> None:
        self.trace = trace
        self.route = route
        self.started = started
        self.metrics = metrics
        self.streaming = False
        self._first = False

    def describe(self, req: Any, sampling: SamplingParams, prompt: list[int], images: list[bytes]) -> None:
        self.trace.set(
            **{
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.request.temperature": sampling.temperature,
                "gen_ai.request.top_p": sampling.top_p,
                "gen_ai.request.top_k": sampling.top_k or None,
                "gen_ai.request.seed": sampling.seed,
                "gen_ai.request.stream": bool(req.stream),
                "gen_ai.request.choice.count": req.n,
                "gen_ai.usage.input_tokens": len(prompt),
                "maverick.images": len(images),
            }
        )
        if self.trace.recording and record_content():  # opted in: the prompt itself
            messages = getattr(req, "messages", None)
            text = json.dumps([m.model_dump(mode="json") for m in messages]) if messages else req.prompt
            self.trace.set(**{"gen_ai.input.messages": str(text)[:65536]})

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            self.metrics.first_token(self.route, time.monotonic() - self.started)

    def finish(self, choices: list[Choice]) -> None:
        u = usage(choices)
        self.trace.set(
            **{
                "gen_ai.response.model": self.trace.model,
                "gen_ai.response.finish_reasons": [c.finish_reason or "abort" for c in choices],
                "gen_ai.usage.output_tokens": u["completion_tokens"],
                "gen_ai.usage.cache_read.input_tokens": u["prompt_tokens_details"]["cached_tokens"],
            }
        )
        if self.trace.recording and record_content():
            self.trace.set(**{"gen_ai.output.messages": json.dumps(["".join(c.text) for c in choices])})

    def done(self, status: int) -> None:
        if self.trace.ended:
            return
        if not self.streaming:
            self.first_token()  # a whole answer arrives at once: its first token is its last byte
        self.metrics.answered(self.route, status, time.monotonic() - self.started)
        self.trace.end(status)


def _log_deadline(rid: str, opened: Opened) -> None:
    """An admitted request ran past its deadline: what admission had forecast for it (a gap
    between the two is an under-prediction of the replica's rates)."""
    forecast = "unmeasured" if opened.forecast_s is None else f"{opened.forecast_s:.2f} s"
    logger.warning(
        "request %s on %s ran past router.request_timeout_s; admitted with a forecast of %s",
        rid,
        opened.replica or opened.predicted or "?",
        forecast,
    )


def _public_param(field: str | None, req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """Engine field names → the OpenAI request field a client would fix."""
    if field is None or not isinstance(req, ChatCompletionRequest):
        return field
    if field == "max_tokens" and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return {"prompt": "messages", "images": "messages"}.get(field.split(".")[0], field)
