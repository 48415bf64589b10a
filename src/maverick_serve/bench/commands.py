"""`maverick-serve bench ...`: the benchmark subcommands (each prints its figures)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from maverick_serve.cli_common import (
    CLIError,
    batch_sizes,
    default_engine_threads,
    default_tiny_model,
    positive,
)
from maverick_serve.config.engine import NativeEngineConfig


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from maverick_serve.bench.engine_bench import format_table, text_only_dir
    from maverick_serve.bench.native_process import bench_native
    from maverick_serve.bench.vllm_cpu import (
        VLLM_UNAVAILABLE_MESSAGE,
        VllmBenchError,
        find_vllm_python,
        run_vllm_cpu_bench,
    )

    model = args.model
    if not (model / "config.json").is_file():
        raise CLIError(f"--model {model} has no config.json (make one with `maverick-serve make-model`)")
    config = NativeEngineConfig(
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


def _factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,1,2,3, got {text!r}"
        ) from None
    if not values or any(not 0 < v <= 20 for v in values):
        raise argparse.ArgumentTypeError(f"every load factor must be in (0, 20], got {text!r}")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600], got {text!r}")
    return value


def cmd_bench_overload(args: argparse.Namespace) -> int:
    from maverick_serve.bench.overload_bench import Workload, format_table, run

    model = args.model or default_tiny_model()
    if not (Path(model) / "config.json").exists():
        raise CLIError(f"--model {model} has no config.json (make one with `maverick-serve make-model`)")
    work = Workload(args.prompt_words, args.max_tokens, args.deadline)
    threads = args.threads or default_engine_threads(args.replicas)
    capacity, levels = run(
        Path(model).resolve(), work, args.factors, args.seconds, args.replicas, threads, args.concurrency
    )
    print(format_table(capacity, levels, work))
    return 0


def cmd_bench_tracing(args: argparse.Namespace) -> int:
    from maverick_serve.bench.tracing_bench import format_table, run

    model = args.model or default_tiny_model()
    if not (Path(model) / "config.json").exists():
        raise CLIError(f"--model {model} has no config.json (make one with `maverick-serve make-model`)")
    results = run(
        Path(model).resolve(), args.concurrency, args.requests, args.rounds, args.max_tokens, args.replicas
    )
    print(format_table(results))
    return 0


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
    cfg = NativeEngineConfig(kv_cache_memory_gib=args.kv_gib, num_threads=args.threads)
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
    if args.engine == "vllm":  # the tier under the vLLM backend: needs .venv-vllm
        from maverick_serve.bench.kvtier_vllm_bench import run_bench as run_vllm
        from maverick_serve.model.make_model import TEXT_ONLY_SUBDIR

        model = args.model or default_tiny_model() / TEXT_ONLY_SUBDIR
        print(run_vllm(model, args.tier_block, args.ttft_tokens, args.rounds, args.budget))
        return 0
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


def cmd_bench_autoscale(args: argparse.Namespace) -> int:
    from maverick_serve.bench.autoscale_bench import (
        DEFAULT_TRACE,
        VARIANTS,
        format_table,
        results_json,
        run_variant,
        write_plot,
    )
    from maverick_serve.config.cluster import ClusterConfig

    if args.min_replicas > args.max_replicas:
        raise CLIError(f"--min-replicas ({args.min_replicas}) exceeds --max-replicas ({args.max_replicas})")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise CLIError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    model = args.model or default_tiny_model()
    fast = {"stable_window_s": 6, "panic_window_s": 2, "upscale_cooldown_s": 2, "downscale_cooldown_s": 10}
    base = ClusterConfig.model_validate(
        {
            "model": {"path": str(model)},
            "engine": {"kv_cache_memory_gib": 0.05, "num_threads": 1, "max_num_seqs": args.max_num_seqs},
            "kvtier": {"enabled": False},
            "resources": {
                "engine": {"num_cpus": 1, "custom_resources": {"fake_gpu": 1}},
                "check_cluster_fit": False,
            },
            "autoscaling": {
                "metrics_push_interval_s": 0.5,
                "signal_window_s": 5,
                "router": {"min_replicas": 1, "max_replicas": 1},
                "engine": {"target_per_replica": args.target_per_replica, **fast},
            },
        }
    )
    trace = tuple((seconds * args.trace_scale, rate) for seconds, rate in DEFAULT_TRACE)
    results = []
    for variant in args.variants:
        print(f"{variant}: {sum(s for s, _ in trace):.0f} s bursty trace ...", flush=True)
        results.append(
            run_variant(
                base,
                variant,
                args.min_replicas,
                args.max_replicas,
                trace,
                args.max_tokens,
                args.seed,
                args.slo_ttft_s,
            )
        )
    print(format_table(results, args.slo_ttft_s))
    plot = write_plot(results, args.plot, args.max_replicas)
    print(f"plot: {plot}")
    if args.json is not None:
        args.json.write_text(results_json(results, args.slo_ttft_s))
    return 0


def cmd_bench_peers(args: argparse.Namespace) -> int:
    from maverick_serve.bench.peers_bench import (
        PEERS,
        Workload,
        format_table,
        results_json,
        run_bench,
        serve_runtime,
    )
    from maverick_serve.bench.vllm_cpu import VLLM_UNAVAILABLE_MESSAGE, find_vllm_python

    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        raise CLIError(f"--peers: unknown {', '.join(unknown)} (choose from {', '.join(PEERS)})")
    for variant in args.serve_runtime:
        try:
            serve_runtime(variant)
        except ValueError as exc:
            raise CLIError(f"--serve-runtime: {exc}") from None
    python = find_vllm_python(args.vllm_python)
    if python is None:  # the client itself is vLLM's
        raise CLIError(
            "bench peers loads every server with `vllm bench serve`'s client.\n" + VLLM_UNAVAILABLE_MESSAGE
        )
    model = args.model or default_tiny_model()
    w = Workload(
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        concurrency=args.concurrency,
        rounds=args.rounds,
        repeat_prompts=args.repeat_prompts,
        serve_runtimes=args.serve_runtime,
    )
    threads = default_engine_threads(1)  # what `up` gives its one engine replica
    try:
        results, alone = run_bench(model, args.peers, python, w, threads)
    except ValueError as exc:
        raise CLIError(f"--model: {exc}") from exc
    print(format_table(results, alone, threads, w))
    if args.json is not None:
        args.json.write_text(results_json(results, alone))
    return 0


def add_bench_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench", required=True
    )
    be = bench.add_parser(
        "engine", help="native engine vs vllm-cpu: prefill, decode at batch sizes, peak RSS"
    )
    be.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    be.add_argument("--prompt-len", type=positive, default=128)
    be.add_argument("--decode-tokens", type=positive, default=32)
    be.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8, 32])
    be.add_argument("--repeats", type=positive, default=3)
    be.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    be.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    be.add_argument("--kv-gib", type=float, default=1.0, help="KV cache memory of our engine")
    be.add_argument("--threads", type=positive, default=None, help="CPU threads for both engines")
    be.add_argument("--vllm-python", type=Path, default=None, help="python of the vllm-cpu venv")
    be.add_argument("--vllm-timeout", type=float, default=900.0)
    be.add_argument("--skip-vllm", action="store_true")
    be.set_defaults(func=cmd_bench_engine)

    bs = bench.add_parser("serve", help="load a running cluster: throughput, TTFT/ITL, router overhead")
    bs.add_argument("--url", default="http://127.0.0.1:8000", help="API base URL")
    bs.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    bs.add_argument("--concurrency", type=batch_sizes, default=[1, 4, 16], help="comma-separated levels")
    bs.add_argument("--requests-per-level", type=positive, default=32)
    bs.add_argument("--image-share", type=float, default=0.25, help="fraction of requests with an image")
    bs.add_argument("--max-tokens", type=positive, default=32)
    bs.add_argument("--app", default="maverick", help="Serve application name (for the handle path)")
    bs.add_argument("--ray-address", default="auto", help="Ray cluster of the app (for the handle path)")
    bs.add_argument("--overhead-samples", type=positive, default=50)
    bs.add_argument("--overhead-prompt-tokens", type=positive, default=64)
    bs.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the served checkpoint: also split the overhead into router code vs Serve's hop",
    )
    bs.set_defaults(func=cmd_bench_serve)

    bt = bench.add_parser(
        "tracing",
        help="throughput and latency with tracing off, sampled at 1 % and at 100 % (three local clusters)",
    )
    bt.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bt.add_argument("--concurrency", type=positive, default=8)
    bt.add_argument("--requests", type=positive, default=48, help="requests per measured round")
    bt.add_argument("--rounds", type=positive, default=5, help="measured rounds per variant (medians)")
    bt.add_argument("--max-tokens", type=positive, default=32)
    bt.add_argument("--replicas", type=positive, default=1, help="engine replicas of each cluster")
    bt.set_defaults(func=cmd_bench_tracing)

    bo = bench.add_parser(
        "overload",
        help="offered load from 0.5x to 3x capacity on a local cluster: goodput, 429 share, TTFT p99",
    )
    bo.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bo.add_argument("--factors", type=_factors, default=[0.5, 1.0, 1.5, 2.0, 3.0], help="x capacity")
    bo.add_argument("--seconds", type=_seconds, default=20.0, help="length of each level")
    bo.add_argument(
        "--deadline", type=_seconds, default=10.0, help="clients' deadline = router.request_timeout_s"
    )
    bo.add_argument("--prompt-words", type=positive, default=64)
    bo.add_argument("--max-tokens", type=positive, default=32)
    bo.add_argument(
        "--concurrency", type=positive, default=8, help="closed-loop clients of the capacity probe"
    )
    bo.add_argument("--replicas", type=positive, default=1, help="engine replicas")
    bo.add_argument("--threads", type=positive, default=None, help="torch threads per engine replica")
    bo.set_defaults(func=cmd_bench_overload)

    ba = bench.add_parser(
        "autoscale",
        help="a bursty trace against fixed-min, fixed-max, Serve's default policy and ours: "
        "SLO attainment, replica-seconds, time to scale up, failures, and a PNG",
    )
    ba.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    ba.add_argument(
        "--variants",
        type=lambda s: [v for v in s.split(",") if v],
        default=["fixed-min", "fixed-max", "serve-default", "maverick"],
    )
    ba.add_argument("--min-replicas", type=positive, default=1)
    ba.add_argument("--max-replicas", type=positive, default=3, help="also the 'GPUs' (fake_gpu) of the Ray")
    ba.add_argument("--target-per-replica", type=float, default=2.0, help="running + waiting per engine")
    ba.add_argument("--max-num-seqs", type=positive, default=2, help="engine batch slots (small: queues)")
    ba.add_argument("--max-tokens", type=positive, default=32)
    ba.add_argument("--slo-ttft-s", type=float, default=1.0, help="TTFT target of the attainment figure")
    ba.add_argument("--trace-scale", type=float, default=1.0, help="stretch (>1) or shrink the trace")
    ba.add_argument("--seed", type=int, default=0)
    ba.add_argument("--plot", type=Path, default=Path(".cache/bench/autoscale.png"))
    ba.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ba.set_defaults(func=cmd_bench_autoscale)

    bx = bench.add_parser("experts", help="EP=1 vs EP=k expert workers: MoE time, decode tok/s, bytes moved")
    bx.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bx.add_argument("--ep", type=batch_sizes, default=[1, 2, 4], help="EP degrees; 1 = experts in the engine")
    bx.add_argument("--batch", type=positive, default=32)
    bx.add_argument("--prompt-len", type=positive, default=64)
    bx.add_argument("--decode-tokens", type=positive, default=32)
    bx.add_argument("--repeats", type=positive, default=3)
    bx.add_argument("--threads", type=positive, default=None, help="torch threads of the engine")
    bx.add_argument("--kv-gib", type=float, default=0.5)
    bx.add_argument(
        "--transports",
        type=lambda s: [t for t in s.split(",") if t],
        default=["actor", "compiled", "gloo"],
        help="transports to measure for EP > 1: actor (Ray calls), compiled (Ray compiled graph), "
        "gloo (the all-to-all collective path on CPU)",
    )
    bx.add_argument("--logical-cpus", type=positive, default=8, help="logical CPUs of the local Ray")
    bx.set_defaults(func=cmd_bench_experts)

    bk = bench.add_parser(
        "kvtier",
        help="KV tier: store/load GB/s vs redis-benchmark, TTFT hit vs cold, bytes, long prefill and resume",
    )
    bk.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bk.add_argument("--tier-block", type=positive, default=256, help="tokens per tier block")
    bk.add_argument("--ttft-tokens", type=positive, default=16384)
    bk.add_argument("--long-tokens", type=int, default=131072, help="long prefill demo (0 skips it)")
    bk.add_argument("--blocks", type=positive, default=2000, help="blocks for the throughput test")
    bk.add_argument("--budget", type=positive, default=2048, help="engine tokens per step")
    bk.add_argument(
        "--engine",
        choices=["native", "vllm"],
        default="native",
        help="vllm: TTFT hit vs cold and bytes through the vLLM backend's connector (run in .venv-vllm)",
    )
    bk.add_argument("--rounds", type=positive, default=3, help="vllm: rounds (a fresh prompt each)")
    bk.set_defaults(func=cmd_bench_kvtier)

    bp = bench.add_parser(
        "peers",
        help="our stack (native and vLLM backend) beside vllm serve and Ray Serve LLM, one client "
        "(vllm bench serve's), one run: tok/s, TTFT, ITL, ratios, and the engine alone",
    )
    bp.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    bp.add_argument(
        "--peers",
        type=lambda s: [p for p in s.split(",") if p],
        default=["vllm-serve", "ray-serve-llm", "native", "vllm-backend"],
        help="comma-separated: vllm-serve, ray-serve-llm, native, native-in-replica "
        "(engine.separate_process: false), vllm-backend",
    )
    bp.add_argument("--input-len", type=positive, default=256)
    bp.add_argument("--output-len", type=positive, default=64)
    bp.add_argument("--num-prompts", type=positive, default=64)
    bp.add_argument("--concurrency", type=positive, default=16)
    bp.add_argument("--rounds", type=positive, default=3, help="measured client runs per server (medians)")
    bp.add_argument(
        "--repeat-prompts",
        action="store_true",
        help="send the same prompts every round (measures prefix-cache hits; default: fresh prompts "
        "per round, so every round prefills cold)",
    )
    bp.add_argument("--vllm-python", type=Path, default=None, help="python of the vllm-cpu venv")
    bp.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    bp.add_argument(
        "--serve-runtime",
        type=lambda s: tuple(p for p in s.split(",") if p),
        default=("proxy",),
        help="comma-separated serve_runtime of our stack, one row each: proxy, direct or haproxy "
        "(serve_runtime.ingress), then any of /plain for throughput_optimized: false, /unpinned for "
        "`up --no-pin-cores`, /colocated for router.colocated (e.g. proxy/unpinned,direct/colocated)",
    )
    bp.set_defaults(func=cmd_bench_peers)

    br = bench.add_parser(
        "router",
        help="router: decision latency at 8/64 replicas, replayed workload per routing policy",
    )
    br.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    br.add_argument("--requests", type=positive, default=48, help="requests in the replayed workload")
    br.add_argument("--concurrency", type=positive, default=4, help="concurrent clients")
    br.add_argument(
        "--policies",
        default="round_robin,cache_aware,multimodal_cache_aware",
        help="comma-separated policies to compare",
    )
    br.set_defaults(func=cmd_bench_router)
