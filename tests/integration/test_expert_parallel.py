"""Expert parallelism on a local Ray cluster: CPU expert workers, same tokens as EP=1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.config.experts import ExpertsConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.experts.placement import PlacementError
from maverick_serve.net import free_port
from maverick_serve.serving.engine_factory import load_native_engine
from serve_helpers import actor_gone

ENGINE = NativeEngineConfig(kv_cache_memory_gib=0.05, max_num_batched_tokens=128)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _experts(ep: int, **kw: object) -> ExpertsConfig:
    return ExpertsConfig.model_validate(
        {
            "mode": "disaggregated",
            "ep_degree": ep,
            "worker_num_cpus": 0.5,
            "worker_threads": 1,
            "name_prefix": f"test-{uuid.uuid4().hex[:6]}",
            **kw,
        }
    )


def _prompts(n: int = 6, skew: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    if skew:  # a handful of tokens repeated: the router sends most of them to few experts
        return [[int(t) for t in torch.randint(100, 104, (40,), generator=g)] for _ in range(n)]
    return [torch.randint(0, 1900, (20 + 15 * i,), generator=g).tolist() for i in range(n)]


def _generate(
    engine: NativeEngine, prompts: list[list[int]], max_tokens: int = 12, on_step: object = None
) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(
            EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        )
    out: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests():
        if callable(on_step):
            on_step(step)
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        step += 1
    return out


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return _generate(NativeEngine.from_pretrained(tiny_model, ENGINE), _prompts())


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_tokens_identical_across_ep_degrees(
    tiny_model: Path, reference: dict[str, list[int]], ep: int
) -> None:
    engine = load_native_engine(tiny_model, ENGINE, _experts(ep))
    assert engine.expert_tier is not None
    try:
        assert _generate(engine, _prompts()) == reference
        stats = engine.expert_tier.transport.stats
        assert stats.calls > 0 and stats.tokens > 0  # really went through the workers
        held = ray.get([w.held.remote() for w in engine.expert_tier.workers])
        assert all(len(h[1]) == 8 // ep for h in held)  # each worker holds only its share
        # The engine replica itself holds no routed expert weights.
        ff = engine.model.language_model.model.layers[1].feed_forward
        assert not any(
            ".experts." in n and p.device.type != "meta" for n, p in ff.named_parameters(prefix="x.")
        )
    finally:
        engine.expert_tier.shutdown()


def test_rebalance_keeps_tokens_and_lowers_imbalance(
    tiny_model: Path, reference: dict[str, list[int]]
) -> None:
    engine = load_native_engine(tiny_model, ENGINE, _experts(2, rebalance={"redundant_slots_per_worker": 2}))
    tier = engine.expert_tier
    assert tier is not None
    try:
        _generate(engine, _prompts())
        uniform = tier.imbalance()
        tier.tracker.window.clear()
        _generate(engine, _prompts(skew=True))
        skewed = tier.imbalance()
        assert skewed > uniform and skewed > 1.2, (uniform, skewed)  # the skewed set overloads one worker
        stats = engine.stats()
        assert stats.expert_imbalance == pytest.approx(skewed)
        assert sum(sum(v) for v in stats.expert_tokens.values()) > 0
        before = tier.placement
        after = tier.rebalance()
        assert after.version == before.version + 1
        assert any(len(ws) > 1 for row in after.replicas.values() for ws in row)  # hot experts replicated
        assert tier.imbalance() < skewed and tier.imbalance() < 1.15
        assert _generate(engine, _prompts()) == reference  # same tokens on the new placement
    finally:
        tier.shutdown()


def test_killed_worker_mid_generation_fails_over(tiny_model: Path, reference: dict[str, list[int]]) -> None:
    engine = load_native_engine(tiny_model, ENGINE, _experts(2, replace_dead_workers=False))
    tier = engine.expert_tier
    assert tier is not None

    def kill_at_step(step: int) -> None:
        if step == 4:
            ray.kill(tier.workers[1])

    try:
        assert _generate(engine, _prompts(), on_step=kill_at_step) == reference
        assert tier.failovers == 1 and tier.alive == {0}
        assert all(ws == (0,) for row in tier.placement.replicas.values() for ws in row)
    finally:
        tier.shutdown()


def test_a_killed_worker_is_replaced_and_gets_its_experts_back(
    tiny_model: Path, reference: dict[str, list[int]]
) -> None:
    engine = load_native_engine(tiny_model, ENGINE, _experts(2))
    tier = engine.expert_tier
    assert tier is not None
    home = tier.home
    dead = tier.workers[1]

    def kill_at_step(step: int) -> None:
        if step == 4:
            ray.kill(dead)

    try:
        assert _generate(engine, _prompts(), on_step=kill_at_step) == reference
        assert tier.failovers == 1
        replacement, loaded = tier._replacing.get(1) or (tier.workers[1], None)
        if loaded is not None:
            assert ray.get(loaded, timeout=120) > 0  # it loaded worker 1's experts
        # The next steps switch back: worker 1 holds its experts again and serves them.
        assert _generate(engine, _prompts()) == reference
        assert tier.replacements == 1 and tier.alive == {0, 1} and tier.placement == home
        assert tier.workers[1] is replacement and replacement != dead
        assert ray.get(replacement.ping.remote())["tokens_served"] > 0
    finally:
        tier.shutdown()


def test_bad_placements_are_refused_at_build(tiny_model: Path) -> None:
    with pytest.raises(PlacementError, match="layer 2, which is not an MoE layer"):
        load_native_engine(
            tiny_model, ENGINE, _experts(2, placement=[{"layer": 2, "expert": 0, "workers": [0]}])
        )
    with pytest.raises(PlacementError, match="names expert 9"):
        load_native_engine(
            tiny_model, ENGINE, _experts(2, placement=[{"layer": 1, "expert": 9, "workers": [0]}])
        )
    with pytest.raises(PlacementError, match=r"names workers \[5\]"):
        load_native_engine(
            tiny_model, ENGINE, _experts(2, placement=[{"layer": 1, "expert": 0, "workers": [5]}])
        )
    with pytest.raises(PlacementError, match="ep_degree=16 exceeds the 8 routed experts"):
        load_native_engine(tiny_model, ENGINE, _experts(16))
    with pytest.raises(PlacementError, match=r"× 100.0 CPU = 200 CPU, but the cluster has"):
        load_native_engine(tiny_model, ENGINE, _experts(2, worker_num_cpus=100))
    with pytest.raises(PlacementError, match="GPU"):
        load_native_engine(tiny_model, ENGINE, _experts(2, worker_num_gpus=1, worker_device="cuda"))


def test_compiled_graph_transport_same_tokens_and_failover(
    tiny_model: Path, reference: dict[str, list[int]]
) -> None:
    engine = load_native_engine(
        tiny_model,
        ENGINE,
        _experts(2, transport={"type": "ray", "compiled": True}, replace_dead_workers=False),
    )
    tier = engine.expert_tier
    assert tier is not None

    def kill_at_step(step: int) -> None:
        if step == 5:
            ray.kill(tier.workers[0])

    try:
        assert _generate(engine, _prompts()) == reference
        assert _generate(engine, _prompts(), on_step=kill_at_step) == reference
        assert tier.failovers == 1 and tier.alive == {1}
    finally:
        tier.shutdown()


def test_collective_transport_all_to_all_over_gloo(tiny_model: Path, reference: dict[str, list[int]]) -> None:
    """The NCCL dispatch/combine code path, run on CPU with the gloo backend (tests/gpu runs NCCL)."""

    port = free_port()
    cfg = _experts(2, transport={"type": "nccl", "backend": "gloo", "master_port": port, "timeout_s": 60})
    engine = load_native_engine(tiny_model, ENGINE, cfg)
    tier = engine.expert_tier
    assert tier is not None
    try:
        assert _generate(engine, _prompts()) == reference
        assert tier.transport.stats.calls > 0 and tier.transport.stats.bytes_moved > 0
    finally:
        tier.shutdown()
    assert all(n > 0 for n in ray.get(tier._serving))  # every worker served layers, then stopped


def test_rebalance_between_steps_mid_generation(tiny_model: Path, reference: dict[str, list[int]]) -> None:
    """Rebalancing applied by the engine loop while requests are in flight fails none of them."""
    cfg = _experts(
        2,
        rebalance={
            "enabled": True,
            "interval_steps": 3,
            "imbalance_threshold": 1.0,
            "redundant_slots_per_worker": 2,
        },
    )
    engine = load_native_engine(tiny_model, ENGINE, cfg)
    tier = engine.expert_tier
    assert tier is not None
    try:
        assert _generate(engine, _prompts()) == reference
        assert tier.rebalances >= 2 and tier.placement.version >= 2
        assert engine.stats().expert_rebalances_total == tier.rebalances
    finally:
        tier.shutdown()


def test_expert_groups_follow_the_engines(tiny_model: Path, reference: dict[str, list[int]]) -> None:
    """engines_per_group: 1: each engine starts its own EP group; the group stops with its engine
    (left, or its lease lapsed), the other engine keeps its workers and its tokens."""
    from maverick_serve.experts.groups import group_worker_name, registry_name

    cfg = _experts(2, engines_per_group=1, group_lease_s=6)
    a = load_native_engine(tiny_model, ENGINE, cfg)
    b = load_native_engine(tiny_model, ENGINE, cfg)
    ta, tb = a.expert_tier, b.expert_tier
    assert ta is not None and tb is not None
    assert cfg.engines_per_group is not None
    registry = ray.get_actor(registry_name(cfg.name_prefix, cfg.engines_per_group, cfg.group_lease_s, 2))
    try:
        assert ta.group_name != tb.group_name
        assert ray.get(registry.groups.remote()) == {ta.group_name: [ta.member], tb.group_name: [tb.member]}
        assert _generate(a, _prompts()) == reference and _generate(b, _prompts()) == reference
        ta.release()  # engine a's replica stopped (scale-down): its group goes, b's stays
        assert ray.get(registry.stopped_groups.remote()) == [ta.group_name]
        assert all(actor_gone(group_worker_name(ta.group_name, i)) for i in range(2))
        assert not any(actor_gone(group_worker_name(tb.group_name, i)) for i in range(2))
        assert _generate(b, _prompts()) == reference
        # Engine b dies without leaving (its lease stops being renewed): its group is stopped once
        # the lease lapses, on the registry's next call.
        tb._heartbeat_stop.set()
        time.sleep(6.5)
        assert ray.get(registry.groups.remote()) == {}
        assert ray.get(registry.stopped_groups.remote()) == [ta.group_name, tb.group_name]
        assert all(actor_gone(group_worker_name(tb.group_name, i)) for i in range(2))
        # A new engine (scale-up) starts a group again, under a new name, and serves the same tokens.
        c = load_native_engine(tiny_model, ENGINE, cfg)
        assert c.expert_tier is not None and c.expert_tier.group_name not in (ta.group_name, tb.group_name)
        assert _generate(c, _prompts()) == reference
        c.expert_tier.release()
    finally:
        ta.release()
        tb.release()
        ray.kill(registry)
