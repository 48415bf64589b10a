"""oneDNN prepacked linear layers (`model/cpu_gemm.py`) against torch's own matmuls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.model.attention import Attention
from maverick_serve.model.cpu_gemm import PackedGemm, cpu_gemm_supported
from maverick_serve.model.layers import FeedForward
from maverick_serve.model.moe import LocalExperts, grouped_expert_forward

pytestmark = pytest.mark.skipif(
    not cpu_gemm_supported(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN linear"
)


def test_packed_gemm_equals_linear_of_the_concatenated_weights_for_any_row_count() -> None:
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(96, 64, generator=g), torch.randn(32, 64, generator=g)
    gemm = PackedGemm([w1, w2])
    x = torch.randn(40, 64, generator=g)
    full = gemm(x)
    assert full.shape == (40, 128)
    torch.testing.assert_close(full, x @ torch.cat([w1, w2]).t(), rtol=1e-5, atol=1e-4)
    # A row's result does not depend on the rows beside it (batch-invariant decoding).
    for rows in (1, 2, 7, 33):
        assert torch.equal(gemm(x[:rows]), full[:rows])
    assert gemm(x[:0]).shape == (0, 128)


def test_packed_experts_equal_the_grouped_matmul_path() -> None:
    torch.manual_seed(0)
    experts = LocalExperts(num_experts=4, hidden=32, intermediate=48)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    tokens, ids = torch.randn(9, 32), torch.tensor([3, 0, 0, 2, 3, 3, 1, 0, 2])
    expected = grouped_expert_forward(tokens, ids, experts.gate_up_proj, experts.down_proj)
    # The grouping both paths share, against each row through its own expert one by one.
    for row, expert in enumerate(ids.tolist()):
        gate, up = (tokens[row] @ experts.gate_up_proj[expert]).chunk(2)
        one_row = (up * torch.nn.functional.silu(gate)) @ experts.down_proj[expert]
        torch.testing.assert_close(expected[row], one_row, rtol=1e-5, atol=1e-5)
    experts.pack_cpu_gemms()
    assert experts.packed is not None and len(experts.packed) == 4
    torch.testing.assert_close(experts.run_experts(tokens, ids), expected, rtol=1e-4, atol=1e-3)
    # An expert no row chose (1), rows out of expert order, one row, none.
    unused = torch.tensor([2, 0, 3, 3, 0])
    want = grouped_expert_forward(tokens[:5], unused, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(experts.run_experts(tokens[:5], unused), want, rtol=1e-4, atol=1e-3)
    one = grouped_expert_forward(tokens[:1], ids[:1], experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(experts.run_experts(tokens[:1], ids[:1]), one, rtol=1e-4, atol=1e-3)
    assert experts.run_experts(tokens[:0], ids[:0]).shape == (0, 32)


def _greedy(engine: NativeEngine, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[float]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, params))
    tokens: dict[str, list[int]] = {}
    logprobs: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.extend(lp.logprob for lp in out.logprobs or [])
    return [tokens[f"r{i}"] for i in range(len(prompts))], logprobs


def test_engine_packs_by_default_and_generates_what_the_unpacked_engine_does(tiny_model: Path) -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1900, (n,), generator=g).tolist() for n in (5, 70, 130)]
    base = {"kv_cache_memory_gib": 0.05, "max_num_batched_tokens": 64}
    packed = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(**base))
    plain = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(**base, cpu_weight_prepack=False))
    layers = list(packed.model.language_model.model.layers)
    assert all(isinstance(m.self_attn, Attention) and m.self_attn.qkv_gemm is not None for m in layers)
    ffn = [m for m in packed.model.modules() if isinstance(m, FeedForward)]
    assert ffn and all(m.gate_up_gemm is not None for m in ffn)
    assert all(m.gate_up_gemm is None for m in plain.model.modules() if isinstance(m, FeedForward))
    assert packed.model.language_model.lm_head_gemm is not None

    packed_tokens, packed_lp = _greedy(packed, prompts, 12)
    plain_tokens, plain_lp = _greedy(plain, prompts, 12)
    assert packed_tokens == plain_tokens
    assert len(packed_lp) == len(plain_lp) == 36
    assert max(abs(a - b) for a, b in zip(packed_lp, plain_lp, strict=True)) < 1e-3
