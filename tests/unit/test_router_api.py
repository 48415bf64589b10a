"""The OpenAI-compatible API in-process (router ASGI app + an engine replica, no Ray)."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.serving.engine_server import EngineServer
from maverick_serve.serving.local_replicas import LocalEngineClient
from maverick_serve.serving.router_server import RouterServer

MODEL = "llama-4-tiny"


def _png(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _smooth_png(w: int, h: int) -> bytes:
    """A gradient: compresses well, so large images fit small body limits."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Api:
    """A tiny sync facade over the ASGI app, so tests read like HTTP calls."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def post(self, path: str, body: Any = None, raw: bytes | None = None, **kw: Any) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()
        return self.loop.run_until_complete(self.client.post(path, content=content, **kw))

    def get(self, path: str) -> httpx.Response:
        return self.loop.run_until_complete(self.client.get(path))


# Every test runs against the engine stepped in the replica and in its own process.
@pytest.fixture(scope="module", params=[False, True], ids=["engine-in-replica", "engine-process"])
def api(tiny_model: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    engine = {"kv_cache_memory_gib": 0.05, "max_model_len": 4096, "separate_process": request.param}
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": MODEL},
            # Every step's delta sent on its own (merging is tested below): per-token streams.
            "engine": {**engine, "stream_interval_s": 0},
            "router": {"max_body_bytes": 300_000, "max_image_bytes": 100_000, "max_images_per_request": 2},
        }
    ).model_dump(mode="json")
    server = EngineServer(cfg)
    router = RouterServer(cfg, LocalEngineClient(server))
    a = Api(router.build_api())
    yield a
    server.shutdown()
    a.loop.close()


def _chat(content: Any, **kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **kw,
    }


def _sse(resp: httpx.Response) -> list[dict[str, Any]]:
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_health_ready_openapi(api: Api) -> None:
    assert api.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready").json()
    assert ready["status"] == "ready" and ready["engine"]["max_model_len"] == 4096
    spec = api.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_chat_streaming_joins_to_non_streamed_text(api: Api) -> None:
    full = api.post("/v1/chat/completions", _chat("Tell me a story", max_tokens=20))
    assert full.status_code == 200
    body = full.json()
    text = body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 20 and body["choices"][0]["finish_reason"] == "length"
    stream = api.post(
        "/v1/chat/completions",
        _chat("Tell me a story", max_tokens=20, stream=True, stream_options={"include_usage": True}),
    )
    chunks = _sse(stream)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert joined == text
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (body["usage"]["prompt_tokens"], 20)
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # same prompt: the prefix cache served it
    assert sum(1 for c in chunks if c["choices"]) >= 10  # really incremental


def test_streamed_completion_logprobs_equal_the_non_streamed(api: Api) -> None:
    """Tokens, logprobs and text_offset of a streamed completion, joined over its chunks, are the
    non-streamed answer's: offsets go on from chunk to chunk instead of restarting at 0."""
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    full = api.post("/v1/completions", body).json()["choices"][0]["logprobs"]
    chunks = [c for c in _sse(api.post("/v1/completions", body | {"stream": True})) if c["choices"]]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(parts) >= 6  # per-step chunks (stream_interval_s 0 in this fixture)
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in p[key]] == full[key], key
    offsets = full["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] > 0


def test_completions_string_and_token_ids(api: Api) -> None:
    a = api.post(
        "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    )
    assert a.status_code == 200 and a.json()["object"] == "text_completion"
    assert a.json()["usage"]["completion_tokens"] == 5
    ids = [1920, 10, 20, 30]
    b = api.post("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0})
    assert b.json()["usage"]["prompt_tokens"] == 4


def test_image_chat_and_n_and_logprobs(api: Api) -> None:
    content = [
        {"type": "image_url", "image_url": {"url": _data_url(_smooth_png(500, 300))}},
        {"type": "text", "text": "What is this?"},
    ]
    r = api.post(
        "/v1/chat/completions", _chat(content, n=2, seed=3, temperature=0.8, logprobs=True, top_logprobs=2)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    # 3 tiles (1x2 grid + global) of 144 patch tokens each are in the prompt.
    assert body["usage"]["prompt_tokens"] > 3 * 144
    lp = body["choices"][0]["logprobs"]["content"]
    assert len(lp) == 8 and len(lp[0]["top_logprobs"]) == 2 and lp[0]["logprob"] <= 0


def test_request_id_is_echoed(api: Api) -> None:
    r = api.post("/v1/chat/completions", _chat("hi"), headers={"x-request-id": "req-42"})
    assert r.headers["x-request-id"] == "req-42" and r.json()["id"] == "chatcmpl-req-42"


BAD: list[tuple[str, Any, int, str | None, str]] = [
    ("invalid json", b"{not json", 400, None, "not valid JSON"),
    (
        "unknown model",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
        "gpt-9",
    ),
    ("missing messages", {"model": MODEL}, 400, "messages", "required"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages", "at least 1 item"),
    ("unknown part", _chat([{"type": "audio", "data": "x"}]), 400, "messages.0.content.0", "'audio'"),
    ("max_tokens over context", _chat("hi", max_tokens=5000), 400, "max_tokens", "context left: 4096"),
    (
        "max_completion_tokens over",
        _chat("hi", max_completion_tokens=5000),
        400,
        "max_completion_tokens",
        "4096",
    ),
    (
        "http image",
        _chat([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]),
        400,
        "messages.0.content.0.image_url.url",
        "remote image URLs are disabled",
    ),
    (
        "ftp image",
        _chat([{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]),
        400,
        "messages.0.content.0.image_url.url",
        "'ftp' is not supported",
    ),
    (
        "bad base64",
        _chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
        400,
        "messages.0.content.0.image_url.url",
        "not valid base64",
    ),
    (
        "not an image",
        _chat([{"type": "image_url", "image_url": {"url": _data_url(b"hello world" * 10)}}]),
        400,
        "messages.0.content.0.image_url.url",
        "image",
    ),
    (
        "image too big",
        _chat([{"type": "image_url", "image_url": {"url": _data_url(_png(220, 220, 1))}}]),
        413,
        "messages.0.content.0.image_url.url",
        "100000-byte limit",
    ),
    (
        "too many images",
        _chat([{"type": "image_url", "image_url": {"url": _data_url(_png(20, 20))}}] * 3),
        400,
        "messages",
        "at most 2",
    ),
    ("temperature", _chat("hi", temperature=-1), 400, "temperature", "greater than or equal to 0"),
    ("top_p", _chat("hi", top_p=0), 400, "top_p", "greater than 0"),
    ("n", _chat("hi", n=9), 400, "n", "between 1 and 4"),
    ("penalty", _chat("hi", presence_penalty=0.5), 400, "presence_penalty", "not supported"),
    ("logprobs", _chat("hi", logprobs=True, top_logprobs=50), 400, "top_logprobs", "between 0 and 20"),
    ("batched prompts", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "batches of 2"),
    ("token out of vocab", {"model": MODEL, "prompt": [5, 99999]}, 400, "prompt", "0..2047"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(
    api: Api, name: str, body: Any, status: int, param: str | None, needle: str
) -> None:
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    r = api.post(path, raw=body) if isinstance(body, bytes) else api.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"]


def test_body_over_limit_is_413_and_replica_still_serves(api: Api) -> None:
    r = api.post("/v1/chat/completions", _chat("x" * 400_000))
    assert r.status_code == 413 and "router.max_body_bytes=300000" in r.json()["error"]["message"]
    ok = api.post("/v1/chat/completions", _chat("still alive?"))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8


def _engine_replica_events(
    tiny_model: Path, max_tokens: int, **engine: Any
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """One greedy request through an `EngineServer`: its config and (event, loop time) pairs."""
    from maverick_serve.engine.types import SamplingParams

    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": MODEL},
            "engine": {"kv_cache_memory_gib": 0.05, "max_model_len": 4096, **engine},
        }
    ).model_dump(mode="json")
    server = EngineServer(cfg)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def collect() -> list[tuple[dict[str, Any], float]]:
        item = {"request_id": "r", "prompt_token_ids": [5, 6, 7, 8], "sampling": params.model_dump()}
        loop = asyncio.get_running_loop()
        return [(e, loop.time()) async for e in server.generate(item)]

    loop = asyncio.new_event_loop()
    try:
        return cfg, loop.run_until_complete(collect())
    finally:
        server.shutdown()
        loop.close()


def test_engine_replica_merges_deltas_per_stream_interval(tiny_model: Path) -> None:
    """After the first token (sent alone, at once), deltas leave at most every
    stream_interval_s, merged; every token arrives in order and the last event finishes."""
    _, timed = _engine_replica_events(tiny_model, 200, stream_interval_s=0.1)
    events = [(e["new_token_ids"], e["finished"], t) for e, t in timed]
    assert sum(len(ids) for ids, _, _ in events) == 200
    assert len(events[0][0]) == 1 and events[-1][1] and not any(f for _, f, _ in events[:-1])
    span = events[-1][2] - events[0][2]
    assert 2 <= len(events) <= 2 + span / 0.1 + 1, (len(events), span)  # one message per interval
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(events[:-1])]  # the finished one leaves at once
    assert all(g >= 0.09 for g in gaps), gaps


def test_an_engine_replicas_first_event_carries_its_load_with_the_request_running(tiny_model: Path) -> None:
    """Routers take the load that comes with a stream's first event (newer than the hub's), so it
    must count the request that just started, and carry the replica's stamp."""
    import time

    before = time.monotonic()
    cfg, timed = _engine_replica_events(tiny_model, 8)
    events = [e for e, _ in timed]
    load = events[0]["load"]
    assert load["running"] == 1 and load["waiting"] == 0, load
    assert before < load["at"] <= time.monotonic()
    assert load["total_kv_blocks"] > 0 and load["max_num_seqs"] == cfg["engine"]["max_num_seqs"]
    assert all("load" not in e for e in events[1:])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_openapi_is_a_valid_31_document_with_every_reference_resolved(api: Api) -> None:
    import jsonschema
    from schemathesis.specs.openapi.definitions import OPENAPI_31  # the official 3.1 meta-schema

    spec = api.get("/openapi.json").json()
    assert spec["openapi"] == "3.1.0"
    jsonschema.Draft202012Validator(OPENAPI_31).validate(spec)
    schemas = spec["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    refs = set(_refs(spec))
    assert refs and all(r.startswith("#/components/schemas/") for r in refs), refs
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas), refs - {
        f"#/components/schemas/{s}" for s in schemas
    }
    assert {"TextPart", "ImagePart", "StreamOptions", "ErrorResponse", "ChatCompletion"} <= set(schemas)
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "502", "503", "504"} == set(responses)
        for code, entry in responses.items():
            if code != "200":
                assert entry["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }
        assert "Retry-After" in responses["429"]["headers"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["model"]["enum"] == [MODEL] and chat["n"]["maximum"] == 4


def test_live_answers_conform_to_the_documented_schemas(api: Api) -> None:
    import jsonschema

    spec = api.get("/openapi.json").json()
    registry_doc = {"components": spec["components"]}

    def check(resp: httpx.Response, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", **registry_doc}
        jsonschema.Draft202012Validator(schema).validate(resp.json())

    check(api.post("/v1/chat/completions", _chat("hi", logprobs=True, top_logprobs=2)), "ChatCompletion")
    check(
        api.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 1}),
        "Completion",
    )
    check(api.get("/v1/models"), "ModelList")
    check(api.get("/ready"), "Ready")
    check(api.post("/v1/chat/completions", _chat("hi", top_p=0)), "ErrorResponse")


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        (
            b'{"model": "llama-4-tiny", "messages": ' + b"[" * 40 + b"]" * 40 + b"}",
            400,
            None,
            "max_json_depth=32",
        ),
        (b"[" * 100_000 + b"]" * 100_000, 400, None, "max_json_depth=32"),
        (
            b'{"model": "llama-4-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            400,
            None,
            "not valid JSON",
        ),
        (_chat("hi", model="../../etc/passwd"), 400, "model", "not a model name"),
        (_chat("hi", model="/models/llama"), 400, "model", "not a model name"),
        (_chat("hi", model="file://x"), 400, "model", "not a model name"),
        (_chat("hi", model="meta-llama/Llama-4-Scout"), 404, "model", "does not exist"),
        (_chat("hi", n=4, max_tokens=70_000), 400, "max_tokens", "router.max_tokens_per_request=262144"),
        (_chat("hi", max_completion_tokens=300_000), 400, "max_completion_tokens", "1 × 300000"),
        (_chat("hi", seed=2**64), 400, "seed", "seed"),
    ],
    ids=[
        "deep",
        "very-deep",
        "nan",
        "dotdot",
        "abs-path",
        "scheme",
        "other-model",
        "n-budget",
        "budget",
        "seed",
    ],
)
def test_hostile_bodies_get_400_naming_the_limit(
    api: Api, body: Any, status: int, param: str | None, says: str
) -> None:
    r = (
        api.post("/v1/chat/completions", raw=body)
        if isinstance(body, bytes)
        else api.post("/v1/chat/completions", body)
    )
    err = r.json()["error"]
    assert r.status_code == status and says in err["message"] and err["param"] == param, r.text
    assert api.post("/v1/chat/completions", _chat("still serving?", max_tokens=2)).status_code == 200


def test_empty_content_lists_are_empty_messages_not_a_template_crash(api: Api) -> None:
    """Found by the API fuzzer: `content: []` on a system message made the template raise (500)."""
    body = _chat("hi", max_tokens=2)
    body["messages"] = [{"role": "developer", "content": []}, {"role": "user", "content": []}]
    r = api.post("/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_a_decompression_bomb_is_refused_from_its_header(api: Api) -> None:
    """75 bytes declaring a 20000 × 20000 canvas (1.2 GB of pixels): refused before decoding."""
    from test_image_processing import _png_header_only

    bomb = _png_header_only(20_000, 20_000)
    assert len(bomb) < 100
    r = api.post(
        "/v1/chat/completions", _chat([{"type": "image_url", "image_url": {"url": _data_url(bomb)}}])
    )
    err = r.json()["error"]
    assert r.status_code == 400 and "max_image_pixels" in err["message"], r.text
    assert err["param"] == "messages.0.content.0.image_url.url"


def test_lone_surrogates_and_integral_floats(api: Api) -> None:
    """A JSON \\ud800 escape made the tokenizer raise (500); 10.0 is an integer to JSON Schema."""
    for path, body, param in [
        ("/v1/completions", b'{"model": "llama-4-tiny", "prompt": "a\\ud800", "max_tokens": 2}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"model": "llama-4-tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages",
        ),
    ]:
        r = api.post(path, raw=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and "surrogate" in r.text, r.text
    r = api.post("/v1/chat/completions", _chat("hi", max_tokens=3.0, n=1.0, seed=4.0, temperature=0.5))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    r = api.post("/v1/chat/completions", _chat("hi", max_tokens=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
