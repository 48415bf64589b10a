"""`maverick-serve bench experts`: EP=1 (local experts) vs EP=k CPU expert workers.

Per EP degree: MoE layer time per decode step, end-to-end decode tokens/s at one batch size
(same difference-of-two-runs method as `bench engine`), bytes moved per token per MoE layer,
and the share of step time spent in dispatch/combine (time inside the transport minus the
workers' own compute, which runs in parallel across workers).
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maverick_serve.bench.engine_bench import _prompts, _run
from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.config.experts import ExpertsConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.experts.tier import ExpertTier
from maverick_serve.model.moe import MoEFeedForward
from maverick_serve.net import free_port
from maverick_serve.serving.engine_factory import load_native_engine


@dataclass
class EPFigures:
    ep: int
    mode: str
    moe_layer_ms: float
    decode_tokens_per_s: float
    bytes_per_token_per_layer: float
    dispatch_share: float
    tier_share: float


TRANSPORT_LABELS = {"actor": "actor-calls", "compiled": "compiled-graph", "gloo": "all-to-all/gloo"}


def _transport(name: str) -> dict[str, Any]:
    if name == "actor":
        return {"type": "ray"}
    if name == "compiled":
        return {"type": "ray", "compiled": True}
    if name == "gloo":
        return {"type": "nccl", "backend": "gloo", "master_port": free_port()}
    raise ValueError(f"--transports: unknown transport {name!r}; choose from {sorted(TRANSPORT_LABELS)}")


def _moe_timer(engine: NativeEngine) -> tuple[list[float], list[Any]]:
    times: list[float] = []
    handles = []
    for layer in engine.model.language_model.model.layers:
        ff = layer.feed_forward
        if isinstance(ff, MoEFeedForward):
            handles.append(ff.register_forward_pre_hook(lambda m, a: setattr(m, "_t0", time.perf_counter())))
            handles.append(
                ff.register_forward_hook(lambda m, a, o: times.append(time.perf_counter() - m._t0))
            )
    return times, handles


def bench_ep(
    model_dir: Path,
    ep: int,
    batch: int,
    prompt_len: int,
    decode_tokens: int,
    repeats: int,
    engine_cfg: NativeEngineConfig,
    transport: str = "actor",
) -> EPFigures:
    experts = None
    if ep > 1:
        experts = ExpertsConfig(
            mode="disaggregated",
            ep_degree=ep,
            worker_num_cpus=0.5,
            worker_threads=1,
            transport=_transport(transport),
            name_prefix=f"bench-{uuid.uuid4().hex[:6]}",
        )
    cfg = engine_cfg.model_copy(
        update={
            "enable_prefix_caching": False,
            "max_num_seqs": max(64, batch),
            "max_num_batched_tokens": max(512, batch * prompt_len),
        }
    )
    engine = load_native_engine(model_dir, cfg, experts)
    tier = engine.expert_tier
    assert tier is None or isinstance(tier, ExpertTier)  # the figures read its transport
    try:
        prompts = _prompts(engine.spec, batch, prompt_len, seed=0)
        _run(engine, prompts, 4, "warmup")
        short = statistics.median(_run(engine, prompts, 1, f"s{r}") for r in range(repeats))
        times, hooks = _moe_timer(engine)
        t_before = tier.transport.stats.seconds if tier else 0.0
        b_before = (tier.transport.stats.bytes_moved, tier.transport.stats.tokens) if tier else (0, 0)
        compute_before = _worker_compute(tier)
        steps_before = engine.stats().steps_total
        start = time.perf_counter()
        long = statistics.median(_run(engine, prompts, 1 + decode_tokens, f"l{r}") for r in range(repeats))
        wall = time.perf_counter() - start
        for h in hooks:
            h.remove()
        steps = engine.stats().steps_total - steps_before
        moe_calls = len(engine.spec.text.moe_layers) * steps
        tier_s = (tier.transport.stats.seconds - t_before) if tier else 0.0
        compute_s = (_worker_compute(tier) - compute_before) / max(1, len(tier.alive)) if tier else 0.0
        moved = (tier.transport.stats.bytes_moved - b_before[0]) if tier else 0
        routed = (tier.transport.stats.tokens - b_before[1]) if tier else 1
        return EPFigures(
            ep=ep if experts else 1,
            mode=TRANSPORT_LABELS[transport] if experts else "local",
            moe_layer_ms=1000 * sum(times) / max(1, moe_calls),
            decode_tokens_per_s=batch * decode_tokens / (long - short) if long > short else float("nan"),
            bytes_per_token_per_layer=moved / max(1, routed),
            dispatch_share=max(0.0, tier_s - compute_s) / wall,
            tier_share=tier_s / wall,
        )
    finally:
        if tier is not None:
            tier.shutdown()


def _worker_compute(tier: Any) -> float:
    if tier is None:
        return 0.0
    import ray

    pings = ray.get([tier.workers[w].ping.remote() for w in sorted(tier.alive)])
    return float(sum(p["compute_seconds"] for p in pings))


def format_table(rows: list[EPFigures], batch: int) -> str:
    lines = [
        f"{'EP':>3} {'mode':<14} {'MoE layer ms':>12} {'decode tok/s @' + str(batch):>18} "
        f"{'bytes/token/layer':>17} {'dispatch+combine':>16} {'in expert tier':>14}"
    ]
    for r in rows:
        lines.append(
            f"{r.ep:>3} {r.mode:<14} {r.moe_layer_ms:>12.2f} {r.decode_tokens_per_s:>18.1f} "
            f"{r.bytes_per_token_per_layer:>17.0f} {r.dispatch_share:>15.1%} {r.tier_share:>14.1%}"
        )
    base = next((r for r in rows if r.ep == 1 and r.mode == "local"), None)
    for two in (r for r in rows if r.ep == 2):
        if base is None:
            break
        ratio = two.decode_tokens_per_s / base.decode_tokens_per_s
        verdict = "met" if ratio >= 0.8 else "MISSED"
        lines.append(f"EP=2 ({two.mode}) / EP=1 decode throughput: {ratio:.2f}× (target ≥ 0.8×: {verdict})")
    return "\n".join(lines)
