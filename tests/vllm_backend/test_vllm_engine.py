"""The vLLM backend inside an engine replica (`EngineServer`, no Ray): same answers to bad input
as the native backend, greedy tokens that agree with the native engine, aborts that free the
KV cache, and the stats the router and autoscaler read."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maverick_serve.serving.engine_server import EngineServer

pytestmark = pytest.mark.vllm

# Above 32768: vLLM applies Llama 4's attention temperature tuning only for long contexts (HF
# and the native engine always do), so a shorter context would change logits past 64 tokens.
MAX_MODEL_LEN = 40960
VOCAB_TEXT = 1900  # the tiny model's ordinary tokens (specials start at 1920)
# A near-tie: the native engine's best two tokens closer than this (nats) may swap in another
# fp32 kernel, so the two engines may part there; before it they must agree token for token.
NEAR_TIE = 1e-3


def _config(model: Path, backend: str) -> dict[str, Any]:
    engine: dict[str, Any] = {"backend": backend, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16}
    if backend == "vllm":
        engine |= {"block_size": 32, "kv_cache_memory_gib": 1}
    else:
        engine |= {"kv_cache_memory_gib": 1.0, "num_threads": 1}
    return {
        "model": {"path": str(model), "served_model_name": "tiny"},
        "engine": engine,
        "kvtier": {"enabled": False},
    }


@pytest.fixture(scope="module")
def servers(text_model: Path) -> Iterator[dict[str, EngineServer]]:
    made = {b: EngineServer(_config(text_model, b), replica_name=b) for b in ("native", "vllm")}
    assert made["native"].engine.max_model_len == made["vllm"].engine.max_model_len == MAX_MODEL_LEN
    yield made
    for server in made.values():
        server.shutdown()


def _item(rid: str, prompt: list[int], **sampling: Any) -> dict[str, Any]:
    return {"request_id": rid, "prompt_token_ids": prompt, "sampling": sampling}


async def _events(server: EngineServer, item: dict[str, Any]) -> list[dict[str, Any]]:
    return [event async for event in server.generate(item)]


# One event loop for the module, as a Serve replica has: AsyncLLM's output handler lives on the
# loop of the first request.
LOOP = asyncio.new_event_loop()


def _run(coro: Any) -> Any:
    return LOOP.run_until_complete(coro)


BAD_ITEMS = {
    "empty prompt": _item("b1", [], max_tokens=4),
    "token outside the vocabulary": _item("b2", [5, 999_999], max_tokens=4),
    "prompt at the context limit": _item("b3", [7] * MAX_MODEL_LEN, max_tokens=1),
    "max_tokens past the context": _item("b4", [5, 6], max_tokens=MAX_MODEL_LEN),
    "negative temperature": _item("b5", [5, 6], temperature=-1.0),
    "top_p 0": _item("b6", [5, 6], top_p=0.0),
    "too many logprobs": _item("b7", [5, 6], logprobs=50),
    "stop token outside the vocabulary": _item("b8", [5, 6], stop_token_ids=[99_999]),
    "image on a text-only model": {**_item("b9", [5, 6], max_tokens=2), "images": [b"\x89PNG"]},
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_input_gets_the_native_backends_answer(servers: dict[str, EngineServer], case: str) -> None:
    answers = {}
    for backend, server in servers.items():
        events = _run(_events(server, BAD_ITEMS[case]))
        assert len(events) == 1 and "error" in events[0], (backend, events)
        answers[backend] = events[0]["error"]
    assert answers["vllm"]["status"] == answers["native"]["status"] == 400
    assert answers["vllm"]["param"] == answers["native"]["param"] is not None
    assert answers["vllm"]["message"] == answers["native"]["message"]
    # ... and the replica still serves.
    ok = _run(_events(servers["vllm"], _item(f"after-{case}", [5, 6, 7], max_tokens=3, temperature=0.0)))
    assert ok[-1]["finished"] and ok[-1]["usage"]["completion_tokens"] == 3


def _greedy(server: EngineServer, rid: str, prompt: list[int], n: int) -> list[dict[str, Any]]:
    events = _run(_events(server, _item(rid, prompt, max_tokens=n, temperature=0.0, logprobs=2)))
    assert events[-1]["finished"] and events[-1]["finish_reason"] == "length", events[-1]
    return [lp for e in events for lp in (e["logprobs"] or [])]


def test_greedy_tokens_agree_with_the_native_engine_up_to_a_near_tie(
    servers: dict[str, EngineServer],
) -> None:
    rng = random.Random(7)
    compared = parted = 0
    for i in range(8):
        prompt = [rng.randrange(VOCAB_TEXT) for _ in range(rng.randrange(4, 200))]
        native = _greedy(servers["native"], f"n{i}", prompt, 24)
        vllm = _greedy(servers["vllm"], f"v{i}", prompt, 24)
        assert len(native) == len(vllm) == 24
        for a, b in zip(native, vllm, strict=True):
            if a["token_id"] != b["token_id"]:
                (_, best), (_, second) = a["top"][:2]
                assert best - second < NEAR_TIE, (i, a, b)
                parted += 1
                break
            compared += 1
            assert abs(a["logprob"] - b["logprob"]) < 1e-3, (i, a, b)
    print(f"greedy native vs vLLM: {compared} tokens equal, {parted} of 8 prompts parted at a near-tie")
    assert compared >= 8 * 24 * 3 // 4


def test_an_abandoned_stream_is_aborted_and_frees_its_blocks(servers: dict[str, EngineServer]) -> None:
    server = servers["vllm"]

    async def abandon() -> int:
        seen = 0
        stream = server.generate(_item("abandoned", [5] * 300, max_tokens=1000, temperature=0.0))
        async for event in stream:
            seen += len(event.get("new_token_ids", []))
            if seen >= 3:
                break
        await stream.aclose()  # what Serve does when the client goes away
        await asyncio.sleep(1.0)
        return seen

    assert _run(abandon()) >= 3
    report = server.engine.load_report()
    assert report["running"] == report["waiting"] == report["queued_prefill_tokens"] == 0
    assert report["total_kv_blocks"] > 0 and report["free_kv_blocks"] == report["total_kv_blocks"]


def test_stats_and_autoscaling_signals_count_the_work(servers: dict[str, EngineServer]) -> None:
    server = servers["vllm"]
    before = _run(server.stats())
    events = _run(_events(server, _item("counted", list(range(10, 74)), max_tokens=16, temperature=0.0)))
    after = _run(server.stats())
    assert events[-1]["usage"] == {"prompt_tokens": 64, "completion_tokens": 16, "cached_tokens": 0}
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == 16
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 64
    assert after["kv_blocks_total"]["vllm"] > 0 and after["steps_total"] > before["steps_total"]
    timing = events[-1]["timing"]
    assert timing["arrival"] <= timing["first_token"] <= timing["finished"]
    # The same prompt again: vLLM's prefix cache serves its full blocks.
    again = _run(_events(server, _item("again", list(range(10, 74)), max_tokens=4, temperature=0.0)))
    assert again[-1]["usage"]["cached_tokens"] == 32  # one full 32-token block (the last is recomputed)
    signals = server.record_autoscaling_stats()
    assert {"running", "waiting", "kv_usage", "pending_prompt_tokens", "ttft_p95_s"} <= set(signals)


def test_a_dead_core_ends_every_request_with_engine_dead_and_fails_the_health_check(
    text_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Its own engine (this one dies). A request in flight and one sent right at the kill both end
    within a second or two as a 503 event, and Serve's health check then fails."""
    import psutil

    def engine_cores() -> dict[int, psutil.Process]:
        return {p.pid: p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()}

    others = engine_cores()  # the module's servers' core lives on for the tests after this one
    # Bound to this process's last CPU core (engine.cpu_cores, as `up` does on CPU).
    core = max(os.sched_getaffinity(0))
    config = _config(text_model, "vllm")
    config["engine"]["cpu_cores"] = [core]
    server = EngineServer(config, replica_name="dying")
    try:
        _run(_events(server, _item("warm", [5, 6, 7], max_tokens=2, temperature=0.0)))
        cores = [p for pid, p in engine_cores().items() if pid not in others]
        assert cores
        # vLLM took the binding (its EngineCore logs it); this process's environment is as it
        # was, so an engine started after this one binds where its own config says.
        logged = capfd.readouterr()
        assert f"VLLM_CPU_OMP_THREADS_BIND='{core}'" in logged.out + logged.err
        assert f"core ids=[{core}]" in logged.out + logged.err
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ

        async def kill_under_load() -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
            long = asyncio.ensure_future(_events(server, _item("long", [5] * 50, max_tokens=5000)))
            await asyncio.sleep(1.0)
            for p in cores:
                p.kill()
            t0 = asyncio.get_running_loop().time()
            at_kill = await _events(server, _item("at-kill", [5, 6], max_tokens=5000, temperature=0.0))
            return await long, at_kill, asyncio.get_running_loop().time() - t0

        in_flight, at_kill, took = _run(asyncio.wait_for(kill_under_load(), 30))
        for events in (in_flight, at_kill):
            assert events[-1]["error"]["status"] == 503, events[-1]
            assert "is down and is being replaced; retry" in events[-1]["error"]["message"]
            assert "EngineDeadError" not in events[-1]["error"]["message"]
        assert took < 5.0
        with pytest.raises(RuntimeError, match="engine stopped"):
            server.check_health()
    finally:
        server.shutdown()


def test_the_model_is_compiled_as_vllm_serve_runs_it_unless_enforce_eager(
    servers: dict[str, EngineServer],
) -> None:
    from vllm.config import CompilationMode

    from maverick_serve.config.engine import VllmEngineConfig
    from maverick_serve.engine.vllm.engine import engine_args

    vllm_config = servers["vllm"].engine.llm.vllm_config  # type: ignore[attr-defined]
    assert vllm_config.model_config.enforce_eager is False
    assert vllm_config.compilation_config.mode != CompilationMode.NONE
    spec = servers["vllm"].engine.spec  # type: ignore[attr-defined]
    eager = VllmEngineConfig(enforce_eager=True)
    assert engine_args(Path("m"), eager, "tiny", spec, False, None, None).enforce_eager is True
    assert engine_args(Path("m"), VllmEngineConfig(), "tiny", spec, False, None, None).enforce_eager is False


def test_prefix_cache_events_reach_the_replica_under_the_routers_block_keys(
    servers: dict[str, EngineServer],
) -> None:
    """vLLM's BlockStored events, re-keyed: the blocks a router hashes from the same prompt."""
    from maverick_serve.engine.block_hashes import chain_block_hashes

    view = servers["vllm"].cache
    assert view is not None and not view.has_tier
    events = view.cache_events(10_000)
    prompt = random.Random(7).choices(range(VOCAB_TEXT), k=100)  # 3 full blocks of 32
    _run(_events(servers["vllm"], _item("ev", prompt, max_tokens=1, temperature=0)))
    router_keys = chain_block_hashes(prompt, 32, [], [])
    assert len(router_keys) == 3
    deadline = time.monotonic() + 10
    while not set(router_keys) <= {h for stored, h in list(events) if stored} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(router_keys) <= {h for stored, h in list(events) if stored}
    assert set(router_keys) <= set(view.cached_blocks())


def test_block_key_map_follows_parents_and_drops_what_it_cannot_name() -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    from maverick_serve.engine.block_hashes import chain_block_hashes
    from maverick_serve.engine.vllm.kv_events import BlockKeyMap

    def stored(hashes: list[int], parent: int | None, tokens: list[int], **kw: Any) -> BlockStored:
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=4,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            **kw,
        )

    keys = BlockKeyMap(4)
    tokens = list(range(12))
    ours = chain_block_hashes(tokens, 4, [], [])
    full = {"group_idx": 1, "kv_cache_spec_kind": "full_attention"}
    assert keys.apply(stored([10, 11], None, tokens[:8], **full)) == [(True, ours[0]), (True, ours[1])]
    assert keys.apply(stored([12], 11, tokens[8:], **full)) == [(True, ours[2])]  # extends its parent
    chunked = {"group_idx": 0, "kv_cache_spec_kind": "chunked_local_attention"}
    assert keys.apply(stored([20], None, tokens[:4], **chunked)) == []  # not the group routers match
    assert keys.apply(stored([30], 99, tokens[:4], **full)) == []  # a parent we never saw
    assert keys.apply(stored([40, 41], None, tokens[:8], extra_keys=[None, ("mm", "x", 0)], **full)) == [
        (True, ours[0])
    ]  # an image's block and what follows it are keyed by what we cannot see
    assert keys.apply(BlockRemoved(block_hashes=[20], medium="GPU", group_idx=0)) == []
    assert keys.apply(BlockRemoved(block_hashes=[12, 77], medium="GPU", group_idx=1)) == [(False, ours[2])]
    assert sorted(keys.apply(AllBlocksCleared())) == sorted(
        [(False, ours[0]), (False, ours[1]), (False, ours[0])]
    )
    assert keys.ours == {}
