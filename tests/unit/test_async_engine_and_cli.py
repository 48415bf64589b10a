"""Async streaming over the engine loop thread, and the CLI's commands and errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from maverick_serve.cli import main
from maverick_serve.config import NativeEngineConfig
from maverick_serve.engine.native.async_engine import AsyncEngine
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineDeadError, EngineRequest, InvalidRequestError, SamplingParams


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def engine(tiny_model: Path) -> NativeEngine:
    return NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(kv_cache_memory_gib=0.05))


def test_concurrent_streams_equal_sync_engine(engine: NativeEngine, tiny_model: Path) -> None:
    prompts = [_prompt(30 + 20 * i, i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sync = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(kv_cache_memory_gib=0.05))
    expected = {}
    for i, p in enumerate(prompts):
        sync.add_request(EngineRequest(str(i), p, params.model_copy()))
        while sync.has_unfinished_requests():
            for o in sync.step():
                expected.setdefault(o.request_id, []).extend(o.new_token_ids)
    runner = AsyncEngine(engine)

    async def one(i: int) -> tuple[list[int], int]:
        tokens, deltas = [], 0
        async for out in runner.generate(EngineRequest(str(i), prompts[i], params.model_copy())):
            tokens.extend(out.new_token_ids)
            deltas += 1
        return tokens, deltas

    async def all_of_them() -> list[tuple[list[int], int]]:
        return await asyncio.gather(*(one(i) for i in range(4)))

    try:
        results = asyncio.run(all_of_them())
    finally:
        runner.shutdown()
    assert {str(i): r[0] for i, r in enumerate(results)} == expected
    # Streamed: a consumer that keeps up gets a delta per step (deltas that piled up while it was
    # busy are merged, so a loaded machine may give fewer, never more).
    assert all(2 <= deltas <= 10 for _, deltas in results)


def test_a_step_wakes_each_caller_loop_once(engine: NativeEngine) -> None:
    """Eight streams on one loop: the engine thread schedules one callback per step for all of
    them, not one per stream (each is a socket write and a GIL hand-off)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runner = AsyncEngine(engine)
    wakeups = 0

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in runner.generate(EngineRequest(str(i), _prompt(12, i), params.model_copy())):
            tokens.extend(out.new_token_ids)
        return tokens

    async def all_of_them() -> tuple[list[list[int]], int]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        schedule = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any) -> Any:
            nonlocal wakeups
            wakeups += callback.__name__ == "_put_all"
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        results = await asyncio.gather(*(one(i) for i in range(8)))
        return results, (await runner.stats()).steps_total

    try:
        results, steps = asyncio.run(all_of_them())
    finally:
        runner.shutdown()
    assert all(len(tokens) == 6 for tokens in results)
    # 8 streams × 6 tokens = 48 deliveries; one wake-up per step that produced outputs.
    assert 6 <= wakeups <= steps < 48


def test_a_crashed_engine_loop_fails_every_waiting_stream(engine: NativeEngine) -> None:
    """A step that raises stops the loop; each stream in flight gets EngineDeadError, none hangs."""

    def broken_step() -> list[Any]:
        raise RuntimeError("boom")

    engine.step = broken_step  # type: ignore[method-assign]
    runner = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def one(i: int) -> BaseException | None:
        try:
            async for _ in runner.generate(EngineRequest(str(i), _prompt(8, i), params.model_copy())):
                pass
        except EngineDeadError as exc:
            return exc
        return None

    async def all_of_them() -> list[BaseException | None]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 30)

    try:
        errors = asyncio.run(all_of_them())
    finally:
        runner.shutdown()
    assert all(isinstance(e, EngineDeadError) and "boom" in str(e) for e in errors), errors
    assert isinstance(runner.error, RuntimeError)


def test_a_slow_consumer_gets_merged_deltas_with_every_token(engine: NativeEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    expected = [o for o in _sync_outputs(engine, _prompt(20, 3), params)]
    runner = AsyncEngine(engine)

    async def slow() -> list[tuple[list[int], str, int, bool]]:
        got = []
        async for out in runner.generate(EngineRequest("slow", _prompt(20, 3), params.model_copy())):
            got.append((out.new_token_ids, out.text_delta, len(out.logprobs or []), out.finished))
            await asyncio.sleep(0.3 if len(got) == 1 else 0)  # falls behind once
        return got

    try:
        got = asyncio.run(slow())
    finally:
        runner.shutdown()
    assert [t for ids, *_ in got for t in ids] == [t for o in expected for t in o.new_token_ids]
    assert "".join(text for _, text, _, _ in got) == "".join(o.text_delta for o in expected)
    assert sum(n for *_, n, _ in got) == 24 and got[-1][3] and not any(f for *_, f in got[:-1])
    assert len(got) < 24  # the tokens made during the pause came as one delta


def _sync_outputs(engine: NativeEngine, prompt: list[int], params: SamplingParams) -> list[Any]:
    engine.add_request(EngineRequest("sync", prompt, params.model_copy()))
    out = []
    while engine.has_unfinished_requests():
        out.extend(engine.step())
    return out


def test_cancelled_stream_aborts_and_frees_blocks(engine: NativeEngine) -> None:
    runner = AsyncEngine(engine)

    async def consume_two() -> None:
        req = EngineRequest(
            "c", _prompt(40, 1), SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        )
        n = 0
        async for _ in runner.generate(req):
            n += 1
            if n == 2:
                break

    async def scenario() -> dict[str, int]:
        await consume_two()
        for _ in range(100):  # the abort is applied by the loop thread
            stats = await runner.stats()
            if stats.running == 0 and sum(stats.kv_blocks_used.values()) == 0:
                break
            await asyncio.sleep(0.02)
        return stats.kv_blocks_used

    try:
        used = asyncio.run(scenario())
    finally:
        runner.shutdown()
    assert sum(used.values()) == 0
    assert engine.stats().generated_tokens_total < 1000


def test_bad_request_raises_to_the_caller(engine: NativeEngine) -> None:
    runner = AsyncEngine(engine)

    async def bad() -> None:
        async for _ in runner.generate(EngineRequest("b", [1, 2], SamplingParams(top_p=2.0))):
            pass

    try:
        with pytest.raises(InvalidRequestError, match="top_p"):
            asyncio.run(bad())
    finally:
        runner.shutdown()


def test_cli_make_model_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-model", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["make-model", "--out", str(tmp_path / "m")]) == 2
    assert "not empty (pass --force" in capsys.readouterr().err
    assert main(["make-model", "--preset", "maverick", "--out", str(tmp_path / "big")]) == 2
    assert "vocab_size is 202048" in capsys.readouterr().err
    assert main(["bench", "engine", "--model", str(tmp_path / "nothing")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--model", str(tmp_path / "m"), "--batch-sizes", "0,8"])
    assert "--batch-sizes must be integers ≥ 1" in capsys.readouterr().err


def test_cli_generate_streams_text(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_model), "--prompt", "hi", "--max-tokens", "5"]) == 0
    assert "[length; prompt" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_model), "--temperature", "-1"]) == 2
    assert "temperature must be ≥ 0" in capsys.readouterr().err


def test_cli_bench_engine_prints_figures(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "bench",
        "engine",
        "--model",
        str(tiny_model),
        "--skip-vllm",
        "--prompt-len",
        "16",
        "--decode-tokens",
        "4",
        "--batch-sizes",
        "1,2",
        "--repeats",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "decode tokens/s @ batch 2" in out and "skipped (--skip-vllm)" in out
