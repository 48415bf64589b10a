"""bench overload's per-request accounting and table, against a mock transport (no cluster)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from maverick_serve.bench.overload_bench import LevelFigures, Workload, _one, format_table
from maverick_serve.cli import build_parser

WORK = Workload(prompt_words=4, max_tokens=2, deadline_s=0.5)


def _sse(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _answer(status: int, delay_s: float = 0.0, body: bytes | None = None) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay_s)
        if status != 200:
            return httpx.Response(
                status, json={"error": {"message": "no", "type": "x", "param": None, "code": None}}
            )
        content = body if body is not None else _sse({"choices": [{"delta": {"content": "hi"}}]})
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def _run(transport: httpx.MockTransport) -> LevelFigures:
    level = LevelFigures(1.0, 1.0, 2.0)

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            await _one(client, {"model": "m"}, WORK, level)

    asyncio.run(go())
    return level


def test_each_answer_is_counted_once_in_its_kind() -> None:
    ok = _run(_answer(200))
    assert (ok.sent, ok.in_time, ok.late, ok.refused, ok.errors) == (1, 1, 0, 0, 0) and len(ok.ttft_s) == 1
    late = _run(_answer(200, delay_s=0.6))
    assert (late.in_time, late.late) == (0, 1)
    refused = _run(_answer(429))
    assert (refused.refused, refused.errors, refused.refused_share) == (1, 0, 1.0)
    failed = _run(_answer(503))
    assert (failed.errors, failed.refused) == (1, 0)
    cut = _run(_answer(200, body=b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'))  # no [DONE]
    assert (cut.in_time, cut.errors) == (0, 1)


def test_table_shows_goodput_against_capacity_and_whether_it_falls() -> None:
    a = LevelFigures(1.0, 2.0, 10.0, sent=20, in_time=18, ttft_s=[0.1, 0.2])
    b = LevelFigures(3.0, 6.0, 10.0, sent=60, in_time=9, refused=40, ttft_s=[0.1, 0.3])
    text = format_table(2.0, [a, b], WORK)
    assert "| 1x | 2.00 | 20 | 1.80 | 0.90 |" in text
    assert "| 3x | 6.00 | 60 | 0.90 | 0.45 | 9 | 0 | 67% |" in text
    assert "goodput past capacity: lowest 0.45 x capacity, at 3x" in text


@pytest.mark.parametrize(
    "bad", [["--factors", "0"], ["--factors", "a,b"], ["--seconds", "-1"], ["--deadline", "x"]]
)
def test_bad_arguments_are_cli_errors(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "overload", *bad])
    assert exc.value.code == 2 and bad[0] in capsys.readouterr().err
