"""`maverick-serve` command line: up, status, make-model, generate, bench, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from maverick_serve.config.engine import EngineConfig
from maverick_serve.config.model import ModelConfigError, ModelSpec
from maverick_serve.config.presets import PRESETS, preset


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-sizes must be comma-separated integers, got {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"--batch-sizes must be integers ≥ 1, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def cmd_make_model(args: argparse.Namespace) -> int:
    from maverick_serve.model.make_model import make_model

    spec = preset(args.preset)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise CLIError(f"--out {args.out} is not empty (pass --force to overwrite)")
    written = make_model(spec, args.out, seed=args.seed, text_only_variant=args.text_only)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from maverick_serve.bench.engine_bench import bench_native, format_table, text_only_dir
    from maverick_serve.bench.vllm_cpu import (
        VLLM_UNAVAILABLE_MESSAGE,
        VllmBenchError,
        find_vllm_python,
        run_vllm_cpu_bench,
    )

    model = args.model
    if not (model / "config.json").is_file():
        raise CLIError(f"--model {model} has no config.json (make one with `maverick-serve make-model`)")
    config = EngineConfig(
        device=args.device, dtype=args.dtype, kv_cache_memory_gib=args.kv_gib, num_threads=args.threads
    )
    print(
        f"benchmarking maverick-serve native on {model} "
        f"(prompt {args.prompt_len}, decode {args.decode_tokens}, batches {args.batch_sizes}) ...",
        flush=True,
    )
    ours = bench_native(model, args.prompt_len, args.decode_tokens, args.batch_sizes, config, args.repeats)
    theirs = None
    why = ""
    python = find_vllm_python(args.vllm_python)
    text_dir = text_only_dir(model)
    if args.skip_vllm:
        why = "skipped (--skip-vllm)"
    elif python is None:
        why = VLLM_UNAVAILABLE_MESSAGE
    elif text_dir is None:
        why = (
            f"{model} is multimodal and has no text-only/ twin; vllm-cpu serves Llama4ForCausalLM only "
            "(make-model --text-only writes one)"
        )
    else:
        print(f"benchmarking vllm-cpu on {text_dir} with {python} ...", flush=True)
        try:
            res = run_vllm_cpu_bench(
                text_dir,
                args.prompt_len,
                args.decode_tokens,
                args.batch_sizes,
                python,
                timeout_s=args.vllm_timeout,
                threads=args.threads,
                dtype=args.dtype,
                repeats=args.repeats,
            )
            from maverick_serve.bench.engine_bench import EngineFigures

            theirs = EngineFigures(
                f"vllm-cpu {res.version}",
                res.prefill_tokens_per_s,
                res.decode_tokens_per_s,
                res.peak_rss_mib,
                [res.notes] if res.notes else [],
            )
        except VllmBenchError as exc:
            why = f"failed: {exc}"
    print(format_table(ours, theirs, args.batch_sizes, why))
    return 0


DEFAULT_MODEL_CACHE = Path(".cache/models")


def default_tiny_model(seed: int = 0) -> Path:
    """The tiny checkpoint under the ignored cache folder, built from its seed on first use."""
    from maverick_serve.model.make_model import make_model

    path = DEFAULT_MODEL_CACHE / f"tiny-seed{seed}"
    if not (path / "model.safetensors").is_file():
        print(f"building the tiny Llama 4 checkpoint in {path} (seed {seed}) ...", flush=True)
        make_model(preset("tiny"), path, seed=seed, text_only_variant=True)
    return path


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from maverick_serve.engine.async_engine import AsyncEngine
    from maverick_serve.engine.inputs import InputProcessor
    from maverick_serve.engine.native import NativeEngine
    from maverick_serve.engine.types import SamplingParams

    model = args.model or default_tiny_model()
    config = EngineConfig(device=args.device, dtype=args.dtype, kv_cache_memory_gib=args.kv_gib)
    engine = NativeEngine.from_pretrained(model, config)
    inputs = InputProcessor.from_pretrained(model, engine.spec, config)
    content: list[dict[str, str]] = [{"type": "image"} for _ in args.image]
    content.append({"type": "text", "text": args.prompt})
    images = [p.read_bytes() for p in args.image]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    request = inputs.build_chat("cli", [{"role": "user", "content": content}], images, sampling)
    runner = AsyncEngine(engine)

    async def stream() -> None:
        async for out in runner.generate(request):
            print(out.text_delta, end="", flush=True)
            if out.finished and out.usage is not None:
                print(
                    f"\n[{out.finish_reason}; prompt {out.usage.prompt_tokens} tokens, "
                    f"completion {out.usage.completion_tokens} tokens]"
                )

    try:
        asyncio.run(stream())
    finally:
        runner.shutdown()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from maverick_serve.serving.local_cluster import load_config, run_local

    config = load_config(args.config)
    updates: dict[str, object] = {}
    if args.model is not None:
        updates["model"] = config.model.model_copy(update={"path": args.model})
    resources = config.resources
    if args.replicas is not None:
        resources = resources.model_copy(
            update={"engine": resources.engine.model_copy(update={"replicas": args.replicas})}
        )
    http = config.http
    if args.port is not None:
        http = http.model_copy(update={"port": args.port})
    if args.dashboard_port is not None:
        http = http.model_copy(update={"dashboard_port": args.dashboard_port})
    if args.metrics_port is not None:
        http = http.model_copy(update={"metrics_export_port": args.metrics_port})
    engine = config.engine
    if engine.device == "cpu" and engine.num_threads is None:
        # Split the cores between engine replicas instead of letting each take all of them.
        per = max(1, (os.cpu_count() or 1) // resources.engine.replicas)
        engine = engine.model_copy(update={"num_threads": per})
    config = config.model_validate(
        {**config.model_dump(), **updates, "resources": resources, "http": http, "engine": engine}
    )
    return run_local(config, ready_timeout_s=args.ready_timeout)


def cmd_status(args: argparse.Namespace) -> int:
    from maverick_serve.serving.local_cluster import print_status

    return print_status(args.address)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    from maverick_serve.bench.serve_bench import format_report, router_overhead, run_level

    url = args.url.rstrip("/")
    try:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise CLIError(
            f"no OpenAI-compatible server at {url} ({exc}); start one with `maverick-serve up`"
        ) from None
    model = args.model or models[0]["id"]
    levels = []
    for conc in args.concurrency:
        print(f"load: concurrency {conc}, {args.requests_per_level} requests ...", flush=True)
        levels.append(
            asyncio.run(
                run_level(
                    url, model, conc, args.requests_per_level, args.image_share, args.max_tokens, seed=conc
                )
            )
        )
    print("router overhead: HTTP vs engine handle ...", flush=True)
    overhead = asyncio.run(
        router_overhead(
            url, model, args.app, args.ray_address, args.overhead_samples, args.overhead_prompt_tokens
        )
    )
    code = None
    if args.model_dir is not None:
        from maverick_serve.bench.serve_bench import router_code_overhead

        print("router code overhead: in-process ASGI vs engine ...", flush=True)
        code = asyncio.run(
            router_code_overhead(str(args.model_dir), args.overhead_samples, args.overhead_prompt_tokens)
        )
    print(format_report(levels, overhead, code))
    return 0


def cmd_bench_experts(args: argparse.Namespace) -> int:
    import ray

    from maverick_serve.bench.experts_bench import bench_ep, format_table

    model = args.model or default_tiny_model()
    if not ray.is_initialized():
        ray.init(
            num_cpus=args.logical_cpus,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    cfg = EngineConfig(kv_cache_memory_gib=args.kv_gib, num_threads=args.threads)
    rows = []
    for ep in args.ep:
        for transport in ["local"] if ep == 1 else args.transports:
            print(f"EP={ep} ({transport}): batch {args.batch}, decode {args.decode_tokens} ...", flush=True)
            rows.append(
                bench_ep(
                    model, ep, args.batch, args.prompt_len, args.decode_tokens, args.repeats, cfg, transport
                )
            )
    print(format_table(rows, args.batch))
    return 0


def cmd_bench_kvtier(args: argparse.Namespace) -> int:
    from maverick_serve.bench.kvtier_bench import run_bench

    model = args.model or default_tiny_model()
    print(run_bench(model, args.tier_block, args.ttft_tokens, args.long_tokens, args.blocks, args.budget))
    return 0


def cmd_bench_router(args: argparse.Namespace) -> int:
    from maverick_serve.bench.router_bench import run_bench

    model = args.model or default_tiny_model()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    print(run_bench(model, args.requests, args.concurrency, policies))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from maverick_serve.router.auth import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        raise SystemExit("hash-key: give the API key as an argument or on stdin")
    print(hash_key(key))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    spec = ModelSpec.from_pretrained_dir(args.model) if args.model else preset(args.preset)
    print(json.dumps(spec.to_hf() if args.hf else spec.model_dump(mode="json"), indent=2))
    return 0


def cmd_config_plan(args: argparse.Namespace) -> int:
    from maverick_serve.experts.placement import dense_bytes, experts_per_worker, plan_worker_bytes

    spec = preset(args.preset)
    gib = 1024**3
    t = spec.text
    print(
        f"{args.preset}: {len(t.moe_layers)} MoE layers × {t.num_local_experts} routed experts "
        f"(3 × {t.hidden_size} × {t.intermediate_size} each); GPU memory {args.gpu_memory_gib:g} GiB, "
        f"{args.reserve_gib:g} GiB reserved for activations/runtime"
    )
    print(
        "attention + dense + shared experts (on engine replicas): "
        f"{dense_bytes(spec, 'bfloat16') / gib:,.1f} GiB bf16, {dense_bytes(spec, 'fp8') / gib:,.1f} GiB fp8"
    )
    print(
        f"{'EP':>4} {'experts/worker':>15} {'bf16 GiB/worker':>16} {'fits':>5} "
        f"{'fp8 GiB/worker':>15} {'fits':>5}"
    )
    budget = args.gpu_memory_gib - args.reserve_gib
    for ep in args.ep:
        per = experts_per_worker(spec, ep, args.redundant)
        bf16 = plan_worker_bytes(spec, ep, "bfloat16", args.redundant) / gib
        fp8 = plan_worker_bytes(spec, ep, "fp8", args.redundant) / gib
        print(
            f"{ep:>4} {per:>15} {bf16:>16,.1f} {'yes' if bf16 <= budget else 'no':>5} {fp8:>15,.1f} "
            f"{'yes' if fp8 <= budget else 'no':>5}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maverick-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a tiny random Llama 4 checkpoint in Hugging Face format")
    mk.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default tiny)")
    mk.add_argument("--out", type=Path, required=True, help="output folder")
    mk.add_argument("--seed", type=int, default=0, help="weights seed; same seed ⇒ identical files")
    mk.add_argument(
        "--text-only",
        action="store_true",
        help="also write the Llama4ForCausalLM variant to OUT/text-only (for vllm-cpu)",
    )
    mk.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    mk.set_defaults(func=cmd_make_model)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench", required=True
    )
    be = bench.add_parser(
        "engine", help="native engine vs vllm-cpu: prefill, decode at batch sizes, peak RSS"
    )
    be.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    be.add_argument("--prompt-len", type=_positive, default=128)
    be.add_argument("--decode-tokens", type=_positive, default=32)
    be.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32])
    be.add_argument("--repeats", type=_positive, default=3)
    be.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    be.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    be.add_argument("--kv-gib", type=float, default=1.0, help="KV cache memory of our engine")
    be.add_argument("--threads", type=_positive, default=None, help="CPU threads for both engines")
    be.add_argument("--vllm-python", type=Path, default=None, help="python of the vllm-cpu venv")
    be.add_argument("--vllm-timeout", type=float, default=900.0)
    be.add_argument("--skip-vllm", action="store_true")
    be.set_defaults(func=cmd_bench_engine)

    up = sub.add_parser("up", help="start a local Ray Serve cluster serving the model (Ctrl-C stops it)")
    up.add_argument(
        "--config", type=Path, default=None, help="ClusterConfig YAML/JSON (or a Serve config file)"
    )
    up.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    up.add_argument("--replicas", type=_positive, default=None, help="engine replicas")
    up.add_argument("--port", type=int, default=None, help="API port (default 8000)")
    up.add_argument("--dashboard-port", type=int, default=None, help="Ray dashboard port (default 8265)")
    up.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default 8080)")
    up.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the engines")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="applications, deployments and replica states of a running cluster")
    st.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard URL")
    st.set_defaults(func=cmd_status)

    gen = sub.add_parser("generate", help="chat with the native engine in this process (text and images)")
    gen.add_argument(
        "--model", type=Path, default=None, help="checkpoint folder (default: the tiny model, built once)"
    )
    gen.add_argument("--prompt", default="Tell me about Llama 4.", help="user message")
    gen.add_argument(
        "--image", type=Path, action="append", default=[], help="image file to attach (repeatable)"
    )
    gen.add_argument("--max-tokens", type=_positive, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--kv-gib", type=float, default=0.5)
    gen.set_defaults(func=cmd_generate)

    bs = bench.add_parser("serve", help="load a running cluster: throughput, TTFT/ITL, router overhead")
    bs.add_argument("--url", default="http://127.0.0.1:8000", help="API base URL")
    bs.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    bs.add_argument("--concurrency", type=_batch_sizes, default=[1, 4, 16], help="comma-separated levels")
    bs.add_argument("--requests-per-level", type=_positive, default=32)
    bs.add_argument("--image-share", type=float, default=0.25, help="fraction of requests with an image")
    bs.add_argument("--max-tokens", type=_positive, default=32)
    bs.add_argument("--app", default="maverick", help="Serve application name (for the handle path)")
    bs.add_argument("--ray-address", default="auto", help="Ray cluster of the app (for the handle path)")
    bs.add_argument("--overhead-samples", type=_positive, default=50)
    bs.add_argument("--overhead-prompt-tokens", type=_positive, default=64)
    bs.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the served checkpoint: also split the overhead into router code vs Serve's hop",
    )
    bs.set_defaults(func=cmd_bench_serve)

    bx = bench.add_parser("experts", help="EP=1 vs EP=k expert workers: MoE time, decode tok/s, bytes moved")
    bx.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bx.add_argument(
        "--ep", type=_batch_sizes, default=[1, 2, 4], help="EP degrees; 1 = experts in the engine"
    )
    bx.add_argument("--batch", type=_positive, default=32)
    bx.add_argument("--prompt-len", type=_positive, default=64)
    bx.add_argument("--decode-tokens", type=_positive, default=32)
    bx.add_argument("--repeats", type=_positive, default=3)
    bx.add_argument("--threads", type=_positive, default=None, help="torch threads of the engine")
    bx.add_argument("--kv-gib", type=float, default=0.5)
    bx.add_argument(
        "--transports",
        type=lambda s: [t for t in s.split(",") if t],
        default=["actor", "compiled", "gloo"],
        help="transports to measure for EP > 1: actor (Ray calls), compiled (Ray compiled graph), "
        "gloo (the all-to-all collective path on CPU)",
    )
    bx.add_argument("--logical-cpus", type=_positive, default=8, help="logical CPUs of the local Ray")
    bx.set_defaults(func=cmd_bench_experts)

    bk = bench.add_parser(
        "kvtier",
        help="KV tier: store/load GB/s vs redis-benchmark, TTFT hit vs cold, bytes, long prefill and resume",
    )
    bk.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bk.add_argument("--tier-block", type=_positive, default=256, help="tokens per tier block")
    bk.add_argument("--ttft-tokens", type=_positive, default=16384)
    bk.add_argument("--long-tokens", type=int, default=131072, help="long prefill demo (0 skips it)")
    bk.add_argument("--blocks", type=_positive, default=2000, help="blocks for the throughput test")
    bk.add_argument("--budget", type=_positive, default=2048, help="engine tokens per step")
    bk.set_defaults(func=cmd_bench_kvtier)

    br = bench.add_parser(
        "router",
        help="router: decision latency at 8/64 replicas, replayed workload per routing policy",
    )
    br.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    br.add_argument("--requests", type=_positive, default=48, help="requests in the replayed workload")
    br.add_argument("--concurrency", type=_positive, default=4, help="concurrent clients")
    br.add_argument(
        "--policies",
        default="round_robin,cache_aware,multimodal_cache_aware",
        help="comma-separated policies to compare",
    )
    br.set_defaults(func=cmd_bench_router)

    hk = sub.add_parser("hash-key", help="print the SHA-256 of an API key for router.auth.keys")
    hk.add_argument("key", nargs="?", default=None, help="the key (default: read one line from stdin)")
    hk.set_defaults(func=cmd_hash_key)

    cfg = sub.add_parser("config", help="inspect model configs").add_subparsers(dest="config", required=True)
    show = cfg.add_parser("show", help="print a preset's or a checkpoint's model spec")
    show.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    show.add_argument("--model", type=Path, default=None, help="read config.json from this folder instead")
    show.add_argument("--hf", action="store_true", help="print as Hugging Face config.json")
    show.set_defaults(func=cmd_config_show)
    plan = cfg.add_parser(
        "plan", help="expert weight bytes per expert worker for EP degrees, and whether they fit"
    )
    plan.add_argument("--preset", default="maverick", choices=sorted(PRESETS))
    plan.add_argument("--ep", type=_batch_sizes, default=[8, 16, 32], help="comma-separated EP degrees")
    plan.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100 80, H200 141)"
    )
    plan.add_argument("--reserve-gib", type=float, default=8.0, help="kept free for activations and runtime")
    plan.add_argument("--redundant", type=int, default=0, help="redundant expert copies per layer")
    plan.set_defaults(func=cmd_config_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CLIError, ModelConfigError, ValueError, OSError) as exc:
        print(f"maverick-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
