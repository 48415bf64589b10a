"""End to end: the real `openai` client against `maverick-serve up` (Ray Serve, 2 engine replicas)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import MODEL_NAME, assert_disconnect_aborts
from maverick_serve.config import NativeEngineConfig
from maverick_serve.engine.inputs import InputProcessor
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import SamplingParams


def _png(w: int, h: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(cluster: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, content: object, **kw: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        **{"temperature": 0, "max_tokens": 12, **kw},  # type: ignore[arg-type]
    )


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_chat_text_and_usage(client: openai.OpenAI) -> None:
    r = _chat(client, "Hello there!")
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 5
    assert r.choices[0].message.content


def test_n_choices_are_served_through_serve_plain_and_streamed(client: openai.OpenAI) -> None:
    """n > 1 fans out to n engine calls from one ingress request; Serve paired them by one shared
    request id and hung (found by the API fuzzer)."""
    full = _chat(client, "four ways", n=4, max_tokens=5, temperature=0.8, seed=3, timeout=60)
    assert sorted(c.index for c in full.choices) == [0, 1, 2, 3]
    assert full.usage is not None and full.usage.completion_tokens == 20
    stream = _chat(client, "four ways", n=4, max_tokens=5, temperature=0.8, seed=3, stream=True, timeout=60)
    texts = ["", "", "", ""]
    for chunk in stream:  # type: ignore[union-attr]
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in full.choices]


def test_chat_with_png_data_url(client: openai.OpenAI) -> None:
    url = "data:image/png;base64," + base64.b64encode(_png(640, 480)).decode()
    r = _chat(
        client, [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url}}]
    )
    assert r.usage is not None and r.usage.prompt_tokens > 144  # image tokens are in the prompt
    assert r.usage.completion_tokens == 12


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="The llama", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage is not None and r.usage.completion_tokens == 6


def test_streaming_joins_to_non_streamed_greedy_text(client: openai.OpenAI) -> None:
    full = _chat(client, "Stream me", max_tokens=24).choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Stream me"}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens == 24


def test_greedy_text_equals_engine_alone(client: openai.OpenAI, cluster: Any) -> None:
    served = _chat(client, "Same as the engine?", max_tokens=16).choices[0].message.content
    cfg = NativeEngineConfig(kv_cache_memory_gib=0.05)
    engine = NativeEngine.from_pretrained(cluster.model_dir, cfg)
    inputs = InputProcessor.from_pretrained(cluster.model_dir, engine.spec, cfg)
    req = inputs.build_chat(
        "x",
        [{"role": "user", "content": "Same as the engine?"}],
        [],
        SamplingParams(temperature=0, max_tokens=16),
    )
    engine.add_request(req)
    text = ""
    while engine.has_unfinished_requests():
        text += "".join(o.text_delta for o in engine.step())
    assert served == text


def test_two_replicas_serve_concurrent_identical_requests(client: openai.OpenAI, cluster: Any) -> None:
    def ask(_: int) -> str:
        return _chat(client, "Concurrency check", max_tokens=16).choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(set(answers)) == 1 and answers[0]
    status = subprocess.run(
        [sys.executable, "-m", "maverick_serve.cli", "status", "--address", cluster.dashboard_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    engine_line = next(line for line in status.stdout.splitlines() if "LlamaEngine" in line)
    assert "running 2" in engine_line and "HEALTHY" in engine_line
    assert "Router" in status.stdout


def test_a_burst_far_past_the_replicas_seats_is_served_not_refused(cluster: Any) -> None:
    """160 requests at once on 2 replicas: admission by predicted wait queues them (they all fit
    the 600 s deadline); the old fixed bound of 32 not-yet-started requests per replica refused
    all but 64."""

    async def burst() -> list[int]:
        client = openai.AsyncOpenAI(
            base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=300
        )

        async def one(i: int) -> int:
            try:
                await client.chat.completions.create(
                    model=MODEL_NAME,
                    messages=[{"role": "user", "content": f"burst request {i} " + "word " * 60}],
                    max_tokens=4,
                )
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        try:
            return list(await asyncio.gather(*(one(i) for i in range(160))))
        finally:
            await client.close()

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 160, {s: statuses.count(s) for s in set(statuses)}


BAD = [
    ("invalid json", b"{oops", 400),
    ("unknown model", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("empty messages", {"model": MODEL_NAME, "messages": []}, 400),
    (
        "unknown part",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
        400,
    ),
    (
        "max_tokens",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
    ),
    (
        "remote image",
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}],
                }
            ],
        },
        400,
    ),
    (
        "bad base64",
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,###"}}],
                }
            ],
        },
        400,
    ),
    (
        "not an image",
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64," + base64.b64encode(b"x" * 64).decode()
                            },
                        }
                    ],
                }
            ],
        },
        400,
    ),
    (
        "too many images",
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64," + base64.b64encode(_png(20, 20)).decode()
                            },
                        }
                    ]
                    * 5,
                }
            ],
        },
        400,
    ),
    (
        "image over limit",
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64,"
                                + base64.b64encode(b"\x89PNG" + bytes(1_100_000)).decode()
                            },
                        }
                    ],
                }
            ],
        },
        413,
    ),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_then_still_serving(
    cluster: Any, client: openai.OpenAI, name: str, body: object, status: int
) -> None:
    raw = body if isinstance(body, bytes) else None
    r = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        content=raw,
        json=None if raw is not None else body,
        timeout=60,
    )
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _chat(client, "still here?", max_tokens=2).usage.completion_tokens == 2  # type: ignore[union-attr]


def test_body_over_limit_is_413(cluster: Any) -> None:
    body = (
        b'{"model": "llama-4-tiny", "messages": [{"role": "user", "content": "' + b"x" * 2_100_000 + b'"}]}'
    )
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions", content=body, timeout=60)
    assert r.status_code == 413 and "router.max_body_bytes=2000000" in r.json()["error"]["message"]


def test_request_id_echoed(cluster: Any) -> None:
    r = httpx.post(
        f"{cluster.base_url}/v1/completions",
        headers={"x-request-id": "e2e-7"},
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.headers.get_list("x-request-id") == ["e2e-7"] and r.json()["id"] == "cmpl-e2e-7"


def test_up_log_shows_urls(cluster: Any) -> None:
    text = Path(cluster.log).read_text()
    assert "API:" in text and "Ray dashboard:" in text


def _session_processes(sid: int, needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            # Engine processes start sessions of their own; their replica is in up's.
            if needle in cmd and sid in (os.getsid(int(entry.name)), os.getsid(parent)):
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def test_engine_processes_get_cores_the_rest_of_the_stack_keeps_off(cluster: Any) -> None:
    """`up` on CPU: engine.cpu_cores = the cores less the first; Ray (so every worker) on the first;
    each engine process claims one core of its own (num_threads 1) or, none left, floats over them."""
    cores = sorted(os.sched_getaffinity(cluster.pid) | os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to partition")
    first, engine_cores = cores[0], set(cores[1:])
    assert os.sched_getaffinity(cluster.pid) == {first}
    engines = _session_processes(os.getsid(cluster.pid), "maverick_serve.serving.engine_process.core")
    masks = [os.sched_getaffinity(pid) for pid in engines]
    assert len(masks) == 2, masks  # the cluster's two engine replicas
    pinned = [m for m in masks if len(m) == 1 and m <= engine_cores]
    assert len(pinned) == min(2, len(engine_cores)), masks
    assert len({min(m) for m in pinned}) == len(pinned), f"two engines on one core: {masks}"
    for m in masks:
        if m not in pinned:
            assert m == engine_cores | {first}, masks
    assert f"engines on CPU cores {sorted(engine_cores)}" in Path(cluster.log).read_text()


def test_engine_stats_reach_prometheus(cluster: Any, client: openai.OpenAI) -> None:
    """Engine replicas export their stats through ray.util.metrics (dashboard + Prometheus)."""
    _chat(client, "metrics please", max_tokens=4)
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(cluster.metrics_url, timeout=10).text
        if "maverick_engine_generation_tokens_total" in text and "maverick_engine_kv_blocks_free" in text:
            break
        time.sleep(2)
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_maverick_engine_generation_tokens_total{")]
    assert lines, text[:2000]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) >= 4
    assert any('group="global"' in ln for ln in text.splitlines() if "maverick_engine_kv_blocks_free" in ln)


def _metric_sum(url: str, name: str) -> float | None:
    lines = [ln for ln in httpx.get(url, timeout=10).text.splitlines() if ln.startswith(f"ray_{name}{{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) if lines else None


def test_client_disconnect_aborts_engine_request(cluster: Any) -> None:
    assert_disconnect_aborts(cluster.base_url, replicas=2)


def test_bench_serve_prints_figures(cluster: Any) -> None:
    cmd = [
        sys.executable,
        "-m",
        "maverick_serve.cli",
        "bench",
        "serve",
        "--url",
        cluster.base_url,
        "--concurrency",
        "1,2",
        "--requests-per-level",
        "4",
        "--max-tokens",
        "4",
        "--overhead-samples",
        "5",
        "--model-dir",
        str(cluster.model_dir),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    table = [ln.split() for ln in out.stdout.splitlines() if ln.strip() and ln.split()[0] in ("1", "2")]
    assert [row[1] for row in table] == ["4", "4"] and all(
        row[3] == "0" for row in table
    )  # 4 requests, 0 errors
    assert "added by HTTP + router: p50" in out.stdout
    assert "of which router code" in out.stdout
