"""`engine.separate_process`: the native engine stepping in its own process behind
`EngineProcessClient`, against the same engine in-process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from maverick_serve.config import NativeEngineConfig
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.native.malloc_env import malloc_environment
from maverick_serve.engine.types import (
    EngineDeadError,
    EngineRequest,
    ImageInput,
    InvalidRequestError,
    RequestOutput,
    RequestTiming,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from maverick_serve.serving.engine_process.client import EngineProcessClient
from maverick_serve.serving.engine_process.wire import (
    error_from_wire,
    error_to_wire,
    output_from_wire,
    output_to_wire,
    request_from_wire,
    request_to_wire,
)

ENGINE = {"kv_cache_memory_gib": 0.05, "separate_process": True}


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cluster(model: Path) -> ClusterConfig:
    return ClusterConfig.model_validate({"model": {"path": str(model)}, "engine": ENGINE})


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[EngineProcessClient]:
    c = EngineProcessClient(tiny_model, _cluster(tiny_model), stats_interval_s=0.2)
    yield c
    c.shutdown()


async def _collect(c: EngineProcessClient, request: EngineRequest) -> list[RequestOutput]:
    return [out async for out in c.generate(request)]


def test_streams_from_the_engine_process_equal_the_engine_in_process(
    client: EngineProcessClient, tiny_model: Path
) -> None:
    prompts = [_prompt(30 + 20 * i, i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    sync = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(kv_cache_memory_gib=0.05))
    expected: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        sync.add_request(EngineRequest(f"r{i}", p, params.model_copy()))
        while sync.has_unfinished_requests():
            for o in sync.step():
                expected.setdefault(o.request_id, []).extend(o.new_token_ids)

    async def all_of_them() -> list[list[RequestOutput]]:
        return await asyncio.gather(
            *(_collect(client, EngineRequest(f"r{i}", p, params.model_copy())) for i, p in enumerate(prompts))
        )

    results = asyncio.run(all_of_them())
    got = {f"r{i}": [t for out in outs for t in out.new_token_ids] for i, outs in enumerate(results)}
    assert got == expected
    for outs in results:
        last = outs[-1]
        assert [o.finished for o in outs].count(True) == 1 and last.finished
        assert (
            last.finish_reason == "length" and last.usage is not None and last.usage.completion_tokens == 10
        )
        assert last.timing is not None and last.timing.first_token is not None
        assert last.timing.arrival <= last.timing.first_token <= time.monotonic()  # one clock per host
        assert sum(len(o.logprobs or []) for o in outs) == 10
    stats = asyncio.run(client.stats())
    assert stats.generated_tokens_total >= 40 and stats.running == 0


def test_bad_input_is_refused_before_it_crosses(client: EngineProcessClient) -> None:
    async def bad(**sampling: object) -> None:
        await _collect(client, EngineRequest("bad", [1, 2, 3], SamplingParams.model_validate(sampling)))

    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(bad(top_p=0))
    assert err.value.field == "top_p"
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(bad(max_tokens=10**7))
    assert err.value.field == "max_tokens"
    assert client.error is None  # the engine serves on
    out = asyncio.run(_collect(client, EngineRequest("after", [1, 2, 3], SamplingParams(max_tokens=2))))
    assert out[-1].usage is not None and out[-1].usage.completion_tokens == 2


def test_closing_a_stream_aborts_it_in_the_engine_process(client: EngineProcessClient) -> None:
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def two_deltas_then_close() -> int:
        gen = client.generate(EngineRequest("long", _prompt(20, 9), params))
        n = 0
        async for _ in gen:
            n += 1
            if n == 2:
                break
        await gen.aclose()
        return n

    assert asyncio.run(two_deltas_then_close()) == 2
    deadline = time.monotonic() + 5
    while client.load_report()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    load = client.load_report()
    assert (load["running"], load["waiting"]) == (0, 0)
    assert load["free_kv_blocks"] == load["total_kv_blocks"]  # its blocks went back to the pool


def test_cache_events_cross_with_the_outputs(client: EngineProcessClient) -> None:
    view = client.cache_view()
    events = view.cache_events(1000)
    tier = view.tier_events(1000)
    assert tier is not None and view.has_tier and not view.tier_shared  # the default in-memory tier
    prompt = _prompt(300, 42)  # 18 full engine blocks of 16, one tier block of 256
    asyncio.run(_collect(client, EngineRequest("cached", prompt, SamplingParams(max_tokens=1))))
    view.flush_tier(5.0)
    stored = {h for is_stored, h in list(events) if is_stored}
    assert len(stored) >= 18
    assert stored <= set(view.cached_blocks())
    assert len(tier) == 1  # the prompt's one full tier block, queued for storing


def test_the_engine_process_starts_with_malloc_keeping_freed_memory(client: EngineProcessClient) -> None:
    # Without it every step's activations fault in fresh pages: a quarter of CPU prefill time.
    # (glibc splits GLIBC_TUNABLES at ':' in place when it parses it, hence the raw bytes.)
    environ = Path(f"/proc/{client._proc.pid}/environ").read_bytes()
    assert b"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432" in environ
    assert b"glibc.malloc.trim_threshold=4294967296" in environ


def test_malloc_tunables_already_set_win_and_others_are_kept() -> None:
    base = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.cpu.hwcaps=-AVX512F"}
    assert malloc_environment(base) == {
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.cpu.hwcaps=-AVX512F"
        ":glibc.malloc.mmap_threshold=33554432"
    }
    assert malloc_environment({}) == {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
    }


def test_a_killed_engine_process_fails_streams_and_new_requests(tiny_model: Path) -> None:
    c = EngineProcessClient(tiny_model, _cluster(tiny_model))
    params = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)

    async def kill_mid_stream() -> int:
        n = 0
        with pytest.raises(EngineDeadError, match="exit code"):
            async for _ in c.generate(EngineRequest("doomed", _prompt(20, 1), params)):
                n += 1
                if n == 2:
                    os.kill(c._proc.pid, signal.SIGKILL)
        return n

    try:
        assert asyncio.run(kill_mid_stream()) >= 2
        assert isinstance(c.error, EngineDeadError)
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(c, EngineRequest("next", [1, 2], SamplingParams(max_tokens=1))))
        with pytest.raises(EngineDeadError):
            asyncio.run(c.stats())
    finally:
        c.shutdown()


def test_a_checkpoint_that_fails_to_load_is_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())  # no weights
    with pytest.raises(RuntimeError, match="engine process failed to load"):
        EngineProcessClient(broken, _cluster(broken))


def test_requests_and_outputs_cross_the_wire_unchanged() -> None:
    pixels = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    request = EngineRequest(
        "img",
        [5, 6, 7],
        SamplingParams(temperature=0.5, top_k=3, stop=["x"], seed=7),
        [ImageInput(pixels, 4, "abc")],
        arrival_time=12.5,
        record_steps=True,
    )
    body, frames = request_to_wire(request)
    back = request_from_wire(body, frames)
    assert (
        torch.equal(back.images[0].pixel_values, pixels)
        and back.images[0].pixel_values.dtype == torch.bfloat16
    )
    assert (back.request_id, back.prompt_token_ids, back.sampling, back.arrival_time, back.record_steps) == (
        "img",
        [5, 6, 7],
        request.sampling,
        12.5,
        True,
    )
    out = RequestOutput(
        "img",
        [9, 10],
        "ab",
        finished=True,
        finish_reason="stop",
        stop_reason="x",
        usage=Usage(3, 2, 1),
        logprobs=[TokenLogprob(9, -0.5, [(9, -0.5), (4, -1.25)]), TokenLogprob(10, float("-inf"), [])],
        timing=RequestTiming(1.0, 1.5, 2.0, 3.0, 0.25, 16, [(1.5, 2.0, 0.1)]),
        tier_keys=["k1"],
    )
    assert output_from_wire(output_to_wire(out)) == out
    plain = RequestOutput("p", [1], "a")
    assert output_from_wire(output_to_wire(plain)) == plain
    refused = error_from_wire(error_to_wire(InvalidRequestError("top_k", "top_k must be -1, 0 or ≥ 1", -1)))
    assert isinstance(refused, InvalidRequestError) and (refused.field, refused.limit) == ("top_k", -1)


def test_separate_process_is_on_unless_the_experts_are_disaggregated(tiny_model: Path) -> None:
    def cluster(engine: dict[str, object], experts: str) -> ClusterConfig:
        return ClusterConfig.model_validate(
            {
                "model": {"path": str(tiny_model)},
                "engine": engine,
                "experts": {"mode": experts},
                "kvtier": {"enabled": False},
            }
        )

    assert cluster({}, "local").engine_in_own_process()
    assert not cluster({}, "disaggregated").engine_in_own_process()
    assert not cluster({"separate_process": False}, "local").engine_in_own_process()
    assert not cluster({"backend": "vllm", "block_size": 32}, "local").engine_in_own_process()
    with pytest.raises(ValidationError, match=r"engine\.separate_process"):
        cluster(ENGINE, "disaggregated")
