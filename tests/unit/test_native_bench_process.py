"""The benches' native figures come from a child process started as `up` starts engine processes
(malloc keeping freed memory), with arguments and results crossing as JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from maverick_serve.bench import native_process
from maverick_serve.bench.engine_bench import EngineFigures
from maverick_serve.bench.peers_bench import Workload
from maverick_serve.config.engine import NativeEngineConfig


def test_engine_alone_runs_each_round_in_an_engine_like_process(tiny_model: Path) -> None:
    w = Workload(input_len=16, output_len=4, num_prompts=4, concurrency=2, rounds=2)
    rounds = native_process.engine_alone(tiny_model / "text-only", w, threads=1)
    assert len(rounds) == 2 and all(r > 0 for r in rounds)


def test_bench_native_figures_cross_back_with_batch_sizes_as_ints(tiny_model: Path) -> None:
    config = NativeEngineConfig(kv_cache_memory_gib=0.05, num_threads=1)
    figures = native_process.bench_native(tiny_model / "text-only", 16, 4, [1, 2], config, repeats=1)
    assert isinstance(figures, EngineFigures)
    assert set(figures.decode_tokens_per_s) == {1, 2}
    assert figures.prefill_tokens_per_s > 0 and figures.peak_rss_mib > 0
    assert "threads=1" in figures.notes[0]


def test_the_child_gets_the_malloc_tunables_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, str]] = []

    class Done:
        stdout, stderr, returncode = 'NATIVE_RESULT {"ok": 1}\n', "", 0

    def run(cmd: list[str], env: dict[str, str], **_: object) -> Done:
        seen.append(env)
        return Done()

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(native_process.subprocess, "run", run)
    assert native_process.run_task("engine-alone", {}) == {"ok": 1}
    assert native_process.run_task("engine-alone", {}, keep_freed_memory=False) == {"ok": 1}
    assert "glibc.malloc.trim_threshold=4294967296" in seen[0]["GLIBC_TUNABLES"]
    assert "GLIBC_TUNABLES" not in seen[1]


def test_a_failing_child_is_an_error_with_its_output() -> None:
    with pytest.raises(RuntimeError, match="unknown task 'nonsense'"):
        native_process.run_task("nonsense", {})
