"""One place that turns a cluster's engine, experts and KV-tier sections into a native engine
with its tiers attached (the engine itself only knows the hooks in `engine.hooks`)."""

from __future__ import annotations

from pathlib import Path

from maverick_serve.config.engine import EngineConfig
from maverick_serve.config.experts import ExpertsConfig
from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.engine.native import NativeEngine
from maverick_serve.experts.tier import expert_tier_factory
from maverick_serve.kvtier.connector import kv_tier_factory


def load_native_engine(
    model_dir: Path,
    engine: EngineConfig | None = None,
    experts: ExpertsConfig | None = None,
    kvtier: KVTierConfig | None = None,
) -> NativeEngine:
    """Load the checkpoint; `experts.mode: disaggregated` keeps the routed experts on expert
    workers, an enabled `kvtier` connects the engine's KV cache to the tier's store."""
    engine = engine or EngineConfig()
    model_dir = Path(model_dir)
    return NativeEngine.from_pretrained(
        model_dir,
        engine,
        expert_tier=expert_tier_factory(experts, model_dir, engine.dtype),
        kv_tier=kv_tier_factory(kvtier, model_dir),
    )
