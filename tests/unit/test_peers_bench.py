"""`bench peers`' table: medians, ratios to vllm serve, the stack vs the engine alone, verdicts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from maverick_serve.bench.commands import add_bench_parsers
from maverick_serve.bench.peers_bench import (
    PeerResult,
    Workload,
    client_command,
    format_table,
    serve_runtime,
    stack_config,
    up_args,
)
from maverick_serve.config.cluster import ClusterConfig


def _round(tps: float, p99: float) -> dict[str, float]:
    return {
        "output_tok_s": tps,
        "ttft_p50_ms": p99 / 2,
        "ttft_p99_ms": p99,
        "itl_p50_ms": 10.0,
        "itl_p99_ms": 30.0,
        "failed": 0,
    }


def test_table_reports_medians_ratios_and_verdicts() -> None:
    vllm = PeerResult("vllm-serve", "vllm serve", [_round(900, 100), _round(1000, 120), _round(1200, 90)])
    ours = PeerResult("native", "ours", [_round(700, 200), _round(850, 140), _round(800, 150)])
    proc = PeerResult("native-in-replica", "ours in replica", [_round(950, 100)])
    ray = PeerResult("ray-serve-llm", "Ray Serve LLM", skipped="`import ray.serve.llm` fails: no pyarrow")
    table = format_table([vllm, ray, ours, proc], alone=[1000.0, 1100.0, 900.0], threads=2, w=Workload())
    assert "1,000.0" in table and "800.0" in table and "0.80x" in table  # medians, not means
    assert "no pyarrow" in table
    assert "ours keeps 0.80x of it" in table and "ours in replica keeps 0.95x of it" in table
    assert "target ours >= 0.8x vllm serve output tok/s: 0.80x (meets)" in table
    assert "target ours TTFT p99 <= 1.5x vllm serve's: 1.50x (meets)" in table  # 150 vs 100
    assert "target ours in replica >= 0.8x vllm serve output tok/s: 0.95x (meets)" in table
    colocated = PeerResult("native", "ours colocated", [_round(600, 100)])  # a second runtime, same peer
    table = format_table([vllm, ours, colocated], alone=None, threads=2, w=Workload())
    assert "target ours colocated >= 0.8x vllm serve output tok/s: 0.60x (MISSES)" in table


def test_table_says_when_a_target_is_missed() -> None:
    vllm = PeerResult("vllm-serve", "vllm serve", [_round(1000, 100)])
    ours = PeerResult("native", "ours", [_round(300, 400)])
    table = format_table([vllm, ours], alone=None, threads=2, w=Workload(rounds=1))
    assert "0.30x (MISSES)" in table and "4.00x (MISSES)" in table


def test_client_command_is_vllm_bench_serve_s_workload(tmp_path: Path) -> None:
    w = Workload(input_len=100, output_len=10, concurrency=3)
    cmd = client_command(tmp_path / "python", "http://h:1", tmp_path / "tok", w, prompts=7)
    joined = " ".join(cmd)
    for part in (
        "--random-input-len 100",
        "--random-output-len 10",
        "--num-prompts 7",
        "--max-concurrency 3",
        "--ignore-eos",
        "--base-url http://h:1",
        "--dataset-name random",
    ):
        assert part in joined


def _seed(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--seed") + 1])


def test_every_client_run_draws_fresh_prompts_unless_repeat_is_asked(tmp_path: Path) -> None:
    # One seed for all runs let every server answer the measured rounds from its prefix cache.
    def seeds(w: Workload) -> list[int]:
        return [
            _seed(client_command(tmp_path / "py", "http://h:1", tmp_path / "t", w, 4, run=r))
            for r in range(4)
        ]

    assert seeds(Workload(seed=5)) == [5, 6, 7, 8]
    assert seeds(Workload(seed=5, repeat_prompts=True)) == [5, 5, 5, 5]
    assert "fresh prompts every round" in format_table([], None, 1, Workload())
    assert "prefix-cache hits" in format_table([], None, 1, Workload(repeat_prompts=True))


def test_measure_warms_up_then_runs_each_round_on_its_own_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from maverick_serve.bench import peers_bench

    seen: list[int] = []
    monkeypatch.setattr(peers_bench, "run_client", lambda cmd: seen.append(_seed(cmd)) or {"run": _seed(cmd)})
    rounds = peers_bench.measure(tmp_path / "py", "http://h:1", tmp_path / "t", Workload(rounds=3))
    assert seen == [0, 1, 2, 3]
    assert [r["run"] for r in rounds] == [1, 2, 3]


def test_unknown_peer_is_a_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    from maverick_serve.cli import main

    assert main(["bench", "peers", "--peers", "vllm-serve,sglang"]) == 2
    assert "--peers: unknown sglang" in capsys.readouterr().err


def test_parser_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "peers"])
    assert args.peers == ["vllm-serve", "ray-serve-llm", "native", "vllm-backend"]
    assert (args.input_len, args.output_len, args.num_prompts, args.concurrency) == (256, 64, 64, 16)
    assert args.serve_runtime == ("proxy",)
    assert args.repeat_prompts is False


def test_native_peers_set_separate_process(tmp_path: Path) -> None:
    assert stack_config(tmp_path, "native", Workload())["engine"]["separate_process"] is True
    assert stack_config(tmp_path, "native-in-replica", Workload())["engine"]["separate_process"] is False
    assert "separate_process" not in stack_config(tmp_path, "vllm", Workload())["engine"]


def test_serve_runtime_variants_become_config_sections(tmp_path: Path) -> None:
    assert serve_runtime("proxy") == {"ingress": "proxy", "throughput_optimized": True}
    assert serve_runtime("direct/plain") == {"ingress": "direct", "throughput_optimized": False}
    cfg = stack_config(tmp_path, "native", Workload(), "haproxy")
    ClusterConfig.model_validate(cfg)  # the row's config is a valid cluster
    assert cfg["serve_runtime"]["ingress"] == "haproxy"
    assert serve_runtime("proxy/unpinned") == serve_runtime("proxy")
    assert up_args("proxy/unpinned") == ["--no-pin-cores"] and up_args("proxy") == []
    colocated = stack_config(tmp_path, "native", Workload(), "direct/colocated/unpinned")
    assert colocated["router"] == {"colocated": True} and up_args("direct/colocated/unpinned")
    assert ClusterConfig.model_validate(colocated).router.colocated
    assert stack_config(tmp_path, "native", Workload(), "direct")["router"] == {"colocated": False}


@pytest.mark.parametrize("bad", ["nginx", "proxy/fast", "colocated"])
def test_unknown_serve_runtime_is_a_cli_error(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    from maverick_serve.cli import main

    assert main(["bench", "peers", "--serve-runtime", f"proxy,{bad}"]) == 2
    err = capsys.readouterr().err
    assert f"--serve-runtime: serve runtime {bad!r}" in err and "proxy|direct|haproxy" in err
