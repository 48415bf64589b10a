"""The native engine's generation against one-at-a-time greedy decoding with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, InvalidRequestError, RequestOutput, SamplingParams
from maverick_serve.model.attention import CHUNKED_GROUP, GLOBAL_GROUP

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: Path, **kw: object) -> NativeEngine:
    cfg = {"kv_cache_memory_gib": 0.05, "max_num_batched_tokens": 48, **kw}
    return NativeEngine.from_pretrained(path, NativeEngineConfig(**cfg))


def _drain(
    engine: NativeEngine, arrivals: dict[int, list[EngineRequest]] | None = None
) -> dict[str, list[RequestOutput]]:
    arrivals = dict(arrivals or {})
    outs: dict[str, list[RequestOutput]] = {}
    step = 0
    while engine.has_unfinished_requests() or arrivals:
        for req in arrivals.pop(step, []):
            engine.add_request(req)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        step += 1
        assert step < 5000
    return outs


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture(scope="module")
def hf_text(tiny_model: Path) -> torch.nn.Module:
    return transformers.Llama4ForCausalLM.from_pretrained(
        tiny_model / "text-only", dtype=torch.float32
    ).eval()


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_continuous_batching_with_chunked_prefill_matches_transformers(
    tiny_model: Path, hf_text: torch.nn.Module
) -> None:
    engine = _engine(tiny_model)
    lengths = [5, 70, 130, 33, 200, 17]
    prompts = [_prompt(n, i) for i, n in enumerate(lengths)]
    reqs = [EngineRequest(str(i), p, GREEDY.model_copy()) for i, p in enumerate(prompts)]
    # Three start together; the rest arrive while those decode (and while 200 is mid-prefill).
    outs = _drain(engine, {0: reqs[:3], 3: [reqs[3]], 9: [reqs[4]], 12: [reqs[5]]})
    for i, p in enumerate(prompts):
        assert _tokens(outs[str(i)]) == _hf_greedy(hf_text, p, 24), f"request {i} (prompt {len(p)})"
        assert outs[str(i)][-1].finish_reason == "length"
        usage = outs[str(i)][-1].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(p), 24)
    assert engine.stats().steps_total > len(lengths)  # really batched over many steps


def test_prefix_cache_hit_gives_cold_tokens(tiny_model: Path) -> None:
    engine = _engine(tiny_model)
    shared = _prompt(150, 11)
    cold = _drain_one(engine, "cold", shared + _prompt(10, 12))
    assert engine.stats().prefix_cache_hit_tokens == 0
    warm = _drain_one(engine, "warm", shared + _prompt(10, 12))
    hit = engine.stats().prefix_cache_hit_tokens
    assert hit >= 144  # whole 16-token blocks of the shared 160-token prompt minus the last token
    assert warm[-1].usage is not None and warm[-1].usage.cached_tokens == hit
    assert _tokens(warm) == _tokens(cold)
    other = _drain_one(engine, "other", shared + _prompt(10, 99))
    assert engine.stats().prefix_cache_hit_tokens - hit >= 144  # shares only the 150-token prefix
    assert _tokens(other) != _tokens(cold)


def _drain_one(
    engine: NativeEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY
) -> list[RequestOutput]:
    engine.add_request(EngineRequest(rid, prompt, params.model_copy()))
    return _drain(engine)[rid]


def test_prefix_cache_off_recomputes(tiny_model: Path) -> None:
    engine = _engine(tiny_model, enable_prefix_caching=False)
    p = _prompt(100, 1)
    a, b = _drain_one(engine, "a", p), _drain_one(engine, "b", p)
    assert engine.stats().prefix_cache_hit_tokens == 0 and _tokens(a) == _tokens(b)


def test_rope_layers_keep_one_chunk_nope_layers_keep_prefix(tiny_model: Path) -> None:
    engine = _engine(tiny_model, max_num_batched_tokens=96)
    chunk, block = 64, 16
    n = 10 * chunk + 5
    engine.add_request(EngineRequest("long", _prompt(n, 3), SamplingParams(temperature=0, max_tokens=4)))
    seq = engine.seqs["long"]
    max_chunked = 0
    while seq.num_computed < n:
        engine.step()
        max_chunked = max(max_chunked, seq.blocks.held(CHUNKED_GROUP))
        assert seq.blocks.held(GLOBAL_GROUP) == -(-seq.num_computed // block)
    # After the prompt: the chunked group holds only the blocks of the current chunk.
    assert seq.blocks.held(CHUNKED_GROUP) <= chunk // block
    assert seq.blocks.held(CHUNKED_GROUP) == 1  # positions 640..644 live in one block
    assert seq.blocks.held(GLOBAL_GROUP) == -(-n // block) == 41
    # During prefill, at most one chunk plus one step's tokens (96) were ever held.
    assert max_chunked <= (chunk + 96) // block + 1
    assert engine.stats().kv_blocks_used[CHUNKED_GROUP] == seq.blocks.held(CHUNKED_GROUP)


def test_long_prompt_tokens_match_with_retention(tiny_model: Path, hf_text: torch.nn.Module) -> None:
    p = _prompt(10 * 64 + 5, 3)
    outs = _drain_one(
        _engine(tiny_model, max_num_batched_tokens=96),
        "x",
        p,
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    )
    assert _tokens(outs) == _hf_greedy(hf_text, p, 8)


def test_preemption_under_kv_pressure_keeps_tokens(tiny_model: Path) -> None:
    prompts = [_prompt(60, s) for s in range(6)]
    ref = {}
    big = _engine(tiny_model)
    for i, p in enumerate(prompts):
        ref[str(i)] = _tokens(_drain_one(big, str(i), p))
    small = _engine(tiny_model, num_kv_blocks=20, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        small.add_request(EngineRequest(str(i), p, GREEDY.model_copy()))
    outs = _drain(small)
    assert small.stats().preemptions_total > 0
    assert {k: _tokens(v) for k, v in outs.items()} == ref


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model: Path) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=16, ignore_eos=True)
    p = _prompt(40, 5)
    alone = _tokens(_drain_one(_engine(tiny_model), "a", p, params))
    engine = _engine(tiny_model)
    engine.add_request(EngineRequest("noise", _prompt(90, 6), SamplingParams(temperature=1.0, max_tokens=16)))
    engine.add_request(EngineRequest("a", p, params.model_copy()))
    assert _tokens(_drain(engine)["a"]) == alone
    other_seed = _tokens(_drain_one(_engine(tiny_model), "b", p, params.model_copy(update={"seed": 8})))
    assert other_seed != alone


def test_top_k_one_equals_greedy(tiny_model: Path) -> None:
    p = _prompt(30, 9)
    greedy = _tokens(_drain_one(_engine(tiny_model), "g", p))
    topk = _tokens(
        _drain_one(
            _engine(tiny_model),
            "k",
            p,
            SamplingParams(temperature=1.5, top_k=1, seed=1, max_tokens=24, ignore_eos=True),
        )
    )
    assert topk == greedy


def test_logprobs(tiny_model: Path) -> None:
    outs = _drain_one(
        _engine(tiny_model),
        "l",
        _prompt(20, 1),
        SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True),
    )
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == 3
    for lp in lps:
        assert len(lp.top) == 5 and lp.top[0][0] == lp.token_id  # greedy picks the top token
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0


def test_stop_string_and_stop_token(tiny_model: Path) -> None:
    engine = _engine(tiny_model)
    p = _prompt(25, 4)
    full = _drain_one(engine, "f", p)
    text = "".join(o.text_delta for o in full)
    tokens = _tokens(full)
    assert len(text) > 6
    stop = text[4:7]
    cut = _drain_one(engine, "s", p, GREEDY.model_copy(update={"stop": [stop]}))
    assert "".join(o.text_delta for o in cut) == text[: text.find(stop)]
    assert cut[-1].finish_reason == "stop" and cut[-1].stop_reason == stop
    by_id = _drain_one(
        engine, "t", p, GREEDY.model_copy(update={"stop_token_ids": [tokens[3]], "ignore_eos": False})
    )
    assert _tokens(by_id) == tokens[: tokens.index(tokens[3]) + 1]
    assert by_id[-1].stop_reason == tokens[3]


def test_abort_finishes_with_abort(tiny_model: Path) -> None:
    engine = _engine(tiny_model)
    engine.add_request(EngineRequest("a", _prompt(20, 1), SamplingParams(temperature=0, max_tokens=100)))
    engine.add_request(EngineRequest("b", _prompt(20, 2), GREEDY.model_copy()))
    engine.step()
    engine.step()
    engine.abort("a")
    outs = _drain(engine)
    assert outs["a"][-1].finished and outs["a"][-1].finish_reason == "abort"
    usage = outs["a"][-1].usage
    assert usage is not None and usage.completion_tokens == 2  # sampled before the abort
    b_usage = outs["b"][-1].usage
    assert outs["b"][-1].finish_reason == "length" and b_usage is not None and b_usage.completion_tokens == 24
    assert engine.stats().kv_blocks_used == {CHUNKED_GROUP: 0, GLOBAL_GROUP: 0}


@pytest.mark.parametrize(
    ("prompt_len", "params", "field", "needle"),
    [
        (10, SamplingParams(max_tokens=0), "max_tokens", "max_tokens must be ≥ 1"),
        (10, SamplingParams(max_tokens=-3), "max_tokens", "max_tokens must be ≥ 1"),
        (10, SamplingParams(temperature=-0.1), "temperature", "temperature must be ≥ 0"),
        (10, SamplingParams(top_p=0.0), "top_p", r"top_p must be in \(0, 1\]"),
        (10, SamplingParams(top_p=1.5), "top_p", r"top_p must be in \(0, 1\]"),
        (10, SamplingParams(logprobs=50), "logprobs", "between 0 and 20"),
        (10, SamplingParams(max_tokens=500), "max_tokens", "context left: 256 - 10 prompt tokens = 246"),
        (256, SamplingParams(), "prompt", "256 tokens; the context limit is 256"),
        (0, SamplingParams(), "prompt", "empty"),
    ],
)
def test_bad_requests_are_refused_before_compute(
    tiny_model: Path, prompt_len: int, params: SamplingParams, field: str, needle: str
) -> None:
    engine = _engine(tiny_model, max_model_len=256)
    with pytest.raises(InvalidRequestError, match=needle) as err:
        engine.add_request(EngineRequest("bad", _prompt(prompt_len, 1), params))
    assert err.value.field == field
    assert not engine.has_unfinished_requests() and engine.stats().steps_total == 0


def test_token_outside_vocab_refused(tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError, match="token id 5000 is outside the vocabulary"):
        _engine(tiny_model).add_request(EngineRequest("x", [1, 2, 5000]))


def test_batched_decode_layout_equals_the_per_sequence_one(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode part built in batched ops addresses the same slots with the same masks as the
    general per-sequence path, across block and attention-chunk boundaries (chunk 64 here)."""
    engine = _engine(tiny_model)
    runner = engine.runner
    general = type(runner).build_batch
    compared: list[int] = []

    def both(self: object, chunks: list, all_logits: bool = False) -> object:
        fast = general(runner, chunks, all_logits)
        with monkeypatch.context() as m:
            m.setattr(type(runner), "_decodes_batchable", lambda *_: False)
            slow = general(runner, chunks, all_logits)
        (fb, fids, _), (sb, sids, _) = fast, slow
        assert fids.tolist() == sids.tolist()
        assert fb.positions.tolist() == sb.positions.tolist()
        assert fb.logits_index.tolist() == sb.logits_index.tolist()
        for g in (CHUNKED_GROUP, GLOBAL_GROUP):
            assert fb.slot_mapping[g].tolist() == sb.slot_mapping[g].tolist(), g
        for fp, sp in zip(fb.parts, sb.parts, strict=True):
            assert (fp.row_start, fp.row_end, fp.num_seqs, fp.max_query_len) == (
                sp.row_start,
                sp.row_end,
                sp.num_seqs,
                sp.max_query_len,
            )
            assert fp.query_pad_index.tolist() == sp.query_pad_index.tolist()
            for g in (CHUNKED_GROUP, GLOBAL_GROUP):
                f, s = fp.groups[g], sp.groups[g]
                assert f.mask is not None and s.mask is not None
                assert torch.equal(f.mask, s.mask), g
                # Padding slots may differ in value; only where the mask lets keys in must they agree.
                keep = s.mask[:, 0].any(dim=1)
                assert torch.equal(f.gather_index[keep], s.gather_index[keep]), g
        compared.append(sum(c.num_tokens == 1 for c in chunks))
        return fast

    monkeypatch.setattr(type(runner), "build_batch", both)
    lengths = [60, 63, 64, 65, 127, 31]  # decodes start on both sides of block and chunk ends
    reqs = [EngineRequest(str(n), _prompt(n, n), GREEDY.model_copy()) for n in lengths]
    _drain(engine, {0: reqs[:4], 5: reqs[4:]})
    assert max(compared) == len(lengths)  # steps where every request decoded were compared


def test_blockwise_attention_generation_equals_dense(tiny_model: Path) -> None:
    prompts = [_prompt(n, n) for n in (150, 400)]
    dense = _engine(tiny_model)
    blockwise = _engine(tiny_model, attention_key_block=48)
    for i, p in enumerate(prompts):
        assert _tokens(_drain_one(blockwise, f"b{i}", p)) == _tokens(_drain_one(dense, f"d{i}", p))


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6, 1e300, 1.7e308])
def test_extreme_temperatures_sample_a_real_token_instead_of_stopping_the_engine(temperature: float) -> None:
    """Found by the API fuzzer: temperature 1e-300 made the softmax NaN and multinomial raised,
    which stopped the engine with every other request on it."""
    from maverick_serve.engine.native.sampler import sample_token

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=10)
    token, _ = sample_token(logits, params, torch.Generator().manual_seed(1))
    assert 0 <= token < 1000
    if temperature < 1e-5:
        assert token == int(torch.argmax(logits))
    else:
        assert token in set(torch.topk(logits, 10).indices.tolist())


def test_logprobs_of_no_mass_are_clamped_to_finite_json() -> None:
    """vLLM reports -inf for a token with no mass; JSON has no -inf (500 / invalid SSE before)."""
    from maverick_serve.serving.openai_format import ResponseFormatter

    class _Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return f"t{ids[0]}"

    fmt = ResponseFormatter("m", _Tok())  # type: ignore[arg-type]
    lps = [{"token_id": 1, "logprob": float("-inf"), "top": [(2, float("nan")), (3, -0.5)]}]
    chat = fmt.chat_logprobs(lps)["content"][0]
    assert chat["logprob"] == -9999.0 and [t["logprob"] for t in chat["top_logprobs"]] == [-9999.0, -0.5]
    comp = fmt.completion_logprobs(lps)
    assert comp["token_logprobs"] == [-9999.0] and comp["top_logprobs"] == [{"t2": -9999.0, "t3": -0.5}]


def test_chunked_layers_attend_per_attention_chunk_with_the_logits_of_one_masked_call(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill chunk is cut at attention-chunk boundaries (64 here) for the chunked layers:
    [40, 200) attends as pieces [40, 64) [64, 128) [128, 192) [192, 200), each over its own
    chunk's keys, and every logit equals (to fp32 rounding) the one masked 160 × 200 call it replaces."""
    engine = _engine(tiny_model, max_num_batched_tokens=512)
    runner = engine.runner
    seqs = {n: EngineRequest(str(n), _prompt(n, n), GREEDY.model_copy()) for n in (200, 90)}
    for r in seqs.values():
        engine.add_request(r)
    chunks = engine.scheduler.schedule()
    assert [c.num_tokens for c in chunks] == [200, 90]
    # Pretend the first 40 tokens of the 200 were computed in an earlier step.
    chunks[0].start, chunks[0].num_tokens = 40, 160
    batch, _, _ = runner.build_batch(chunks)
    (part,) = batch.parts
    chunked = part.groups[CHUNKED_GROUP]
    assert chunked.queries is not None and chunked.mask is not None
    # 4 pieces of the first chunk, 2 of the second ([0, 64) [64, 90)), at most 64 queries each.
    assert (chunked.queries.num_seqs, chunked.queries.max_query_len) == (6, 64)
    assert chunked.mask.shape == (6, 1, 64, 64)
    assert part.groups[GLOBAL_GROUP].queries is None and part.max_query_len == 160

    split = runner.execute(chunks, all_logits=True)
    with monkeypatch.context() as m:
        m.setattr(
            type(runner),
            "_chunk_pieces",
            lambda self, keys, kstart, start, end: [(keys, torch.arange(start, end), kstart)],
        )
        whole = runner.execute(chunks, all_logits=True)
        assert runner.build_batch(chunks)[0].parts[0].groups[CHUNKED_GROUP].mask.shape[2] == 160
    assert split.shape == (250, 2048)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)  # fp32: the same sums, reassociated
