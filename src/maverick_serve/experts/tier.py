"""The expert tier as seen by one engine: workers, placement, transport, load statistics,
rebalancing and failover, plugged into the model through `ExpertExecutor`."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maverick_serve.config.experts import ExpertsConfig, NcclTransportConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.native.hooks import ExpertHooks, ExpertTierFactory
from maverick_serve.experts.collective import CollectiveTransport
from maverick_serve.experts.groups import ExpertGroupRegistry, group_pg_name, group_worker_name, registry_name
from maverick_serve.experts.placement import ExpertPlacement, PlacementError
from maverick_serve.experts.rebalance import rebalanced
from maverick_serve.experts.stats import ExpertLoadTracker
from maverick_serve.experts.transport import (
    ExpertTransport,
    ExpertWorkerDied,
    RayActorTransport,
    RayCompiledTransport,
)
from maverick_serve.experts.worker import ExpertWorker
from maverick_serve.model.llama4 import Llama4Model
from maverick_serve.model.moe import ExpertExecutor, MoEFeedForward

logger = logging.getLogger(__name__)


class RemoteExperts(nn.Module, ExpertExecutor):
    """Stands in for `LocalExperts` in one MoE layer; runs the layer's experts elsewhere."""

    def __init__(
        self, run_layer: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], layer: int
    ) -> None:
        super().__init__()
        self.run_layer = run_layer
        self.layer = layer

    def run_experts(self, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return self.run_layer(self.layer, tokens, expert_ids)


def check_resources(cfg: ExpertsConfig, available: dict[str, float]) -> None:
    """Refuse at build time a worker count the cluster cannot place (instead of hanging)."""
    for key, per in (("CPU", cfg.worker_num_cpus), ("GPU", cfg.worker_num_gpus)):
        need = per * cfg.ep_degree
        have = available.get(key, 0.0)
        if need > have:
            raise PlacementError(
                f"experts.ep_degree={cfg.ep_degree} workers × {per} {key} = {need:g} {key}, "
                f"but the cluster has {have:g} {key}"
            )


def expert_tier_factory(cfg: ExpertsConfig | None, model_dir: Path, dtype: str) -> ExpertTierFactory | None:
    """What `NativeEngine.from_pretrained` takes with `experts.mode: disaggregated`, else None."""
    if cfg is None or cfg.mode != "disaggregated":
        return None
    remote = cfg
    return lambda spec: ExpertTier(model_dir, spec, remote, dtype=dtype)


class ExpertTier(ExpertHooks):
    def __init__(self, model_dir: Path, spec: ModelSpec, cfg: ExpertsConfig, dtype: str = "float32") -> None:
        import ray

        self.spec = spec
        self.cfg = cfg
        self._step_dispatch_s = 0.0  # this step's wait on expert workers, summed over MoE layers
        entries = [(p.layer, p.expert, p.workers) for p in cfg.placement]
        self.placement = ExpertPlacement.from_explicit(spec, cfg.ep_degree, entries)
        # With engines_per_group the workers are this engine's group's (joined here, started by
        # the first engine that joins it); otherwise the one group every engine replica shares.
        self.member = uuid.uuid4().hex
        self.registry: Any = None
        self.group_name, self.group_slot = cfg.name_prefix, 0
        self._heartbeat_stop = threading.Event()
        self.lost_group = False  # the registry dropped this engine: its workers may be gone
        if cfg.engines_per_group is not None:
            self._join_group(ray)
        try:
            self._start(ray, model_dir, spec, dtype)
        except BaseException:
            self.release()  # a failed start gives its place back instead of renewing it forever
            raise

    def _start(self, ray: Any, model_dir: Path, spec: ModelSpec, dtype: str) -> None:
        cfg = self.cfg
        self.group = self._placement_group(ray)
        ray.get(self.group.ready(), timeout=120)
        self._worker_args = (str(model_dir), dtype)
        self.workers: list[Any] = [self._spawn(i) for i in range(cfg.ep_degree)]
        self.alive = set(range(cfg.ep_degree))
        self.home = self.placement  # where experts go back to once dead workers are replaced
        self._replacing: dict[int, tuple[Any, Any]] = {}  # worker → (replacement, its load() ref)
        self.replacements = 0
        ray.get([w.load.remote(self.placement.assignments(i)) for i, w in enumerate(self.workers)])
        self.transport: ExpertTransport
        self._serving: list[Any] = []
        if isinstance(cfg.transport, NcclTransportConfig):
            self.transport = self._start_collective(cfg.transport, spec)
        elif cfg.transport.compiled:
            self.transport = RayCompiledTransport(self.workers, self.placement)
        else:
            self.transport = RayActorTransport(self.workers, self.placement)
        self.tracker = ExpertLoadTracker(
            spec.text.moe_layers, spec.text.num_local_experts, cfg.load_window_steps
        )
        self.steps = 0
        self.rebalances = 0
        self.failovers = 0

    def _join_group(self, ray: Any) -> None:
        cfg = self.cfg
        assert cfg.engines_per_group is not None
        self.registry = (
            ray.remote(ExpertGroupRegistry)
            .options(
                name=registry_name(cfg.name_prefix, cfg.engines_per_group, cfg.group_lease_s, cfg.ep_degree),
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
            )
            .remote(cfg.name_prefix, cfg.engines_per_group, cfg.group_lease_s, cfg.ep_degree)
        )
        self.group_name = ray.get(self.registry.join.remote(self.member), timeout=60)
        self.group_slot = int(self.group_name.rsplit("-g", 1)[1].split(".")[0])
        logger.info("engine %s uses expert group %s", self.member[:8], self.group_name)
        threading.Thread(target=self._renew_lease, name="expert-group-lease", daemon=True).start()

    def _renew_lease(self) -> None:
        import ray

        while not self._heartbeat_stop.wait(self.cfg.group_lease_s / 3):
            try:
                if not ray.get(self.registry.renew.remote(self.member), timeout=self.cfg.group_lease_s):
                    # Its workers are stopped or about to be: fail the next MoE layer so the engine
                    # reports an error and Serve replaces the replica (which joins afresh).
                    self.lost_group = True
                    logger.error(
                        "expert group %s dropped this engine (its lease lapsed); failing its steps",
                        self.group_name,
                    )
                    return
            except Exception as exc:  # the registry busy or restarting: try again next time
                logger.warning("expert group lease not renewed: %r", exc)

    def release(self) -> None:
        """Leave the group (the registry stops it if this was its last engine); shared: nothing."""
        self._heartbeat_stop.set()
        if self.registry is None:
            return
        import ray

        with contextlib.suppress(Exception):  # the registry gone: the lease lapses instead
            ray.get(self.registry.leave.remote(self.member), timeout=30)

    def _spawn(self, i: int) -> Any:
        """Worker `i` in bundle `i` of the tier's placement group: the one every engine replica
        sharing the tier finds by name (`get_if_exists`: the first to ask creates it)."""
        import ray

        cfg = self.cfg
        strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=i
        )
        model_dir, dtype = self._worker_args
        return (
            ray.remote(ExpertWorker)
            .options(
                name=group_worker_name(self.group_name, i),
                get_if_exists=True,
                lifetime="detached",  # shared by every engine replica; outlives any one of them
                num_cpus=cfg.worker_num_cpus,
                num_gpus=cfg.worker_num_gpus,
                resources=cfg.worker_custom_resources,
                max_restarts=0,  # a restarted actor would come back without its experts: replaced instead
                max_concurrency=2,  # the collective serve loop blocks one thread; load/ping use the other
                scheduling_strategy=strategy,
            )
            .remote(model_dir, i, dtype, cfg.worker_device, cfg.worker_threads)
        )

    def _start_collective(self, tcfg: NcclTransportConfig, spec: ModelSpec) -> ExpertTransport:
        """Engine = rank 0, worker w = rank w + 1; workers block in their serve loop (a threaded
        actor keeps load/ping answerable)."""
        import datetime

        import ray
        import torch.distributed as dist

        from maverick_serve.experts.collective import CollectiveTransport

        init = f"tcp://{ray.util.get_node_ip_address()}:{tcfg.master_port + self.group_slot}"
        world = self.cfg.ep_degree + 1
        self._serving = [
            w.serve_collective.remote(init, i + 1, world, tcfg.backend, tcfg.timeout_s)
            for i, w in enumerate(self.workers)
        ]
        dist.init_process_group(
            tcfg.backend,
            init_method=init,
            rank=0,
            world_size=world,
            timeout=datetime.timedelta(seconds=tcfg.timeout_s),
        )
        device = torch.device("cuda" if tcfg.backend == "nccl" else "cpu")
        return CollectiveTransport(self.placement, spec.text.hidden_size, device)

    def _placement_group(self, ray: Any) -> Any:
        """One named group per tier: engine replicas sharing the tier find it instead of each
        reserving their own (the first creates it; a racing replica takes the winner's)."""
        cfg = self.cfg
        name = group_pg_name(self.group_name)
        with contextlib.suppress(ValueError):
            return ray.util.get_placement_group(name)
        check_resources(cfg, ray.available_resources())
        bundle = {
            "CPU": cfg.worker_num_cpus,
            **({"GPU": cfg.worker_num_gpus} if cfg.worker_num_gpus else {}),
            **cfg.worker_custom_resources,
        }
        try:
            return ray.util.placement_group(
                [bundle] * cfg.ep_degree, strategy=cfg.placement_strategy, name=name, lifetime="detached"
            )
        except ValueError:
            return ray.util.get_placement_group(name)

    # ---- data plane ------------------------------------------------------------------------
    def attach(self, model: Llama4Model) -> None:
        for layer in self.spec.text.moe_layers:
            ff = model.language_model.model.layers[layer].feed_forward
            assert isinstance(ff, MoEFeedForward)
            ff.experts = RemoteExperts(self.run_layer, layer)

    def run_layer(self, layer: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if self.lost_group:
            raise RuntimeError(f"expert group {self.group_name} dropped this engine (its lease lapsed)")
        self.tracker.record(layer, expert_ids)
        started = time.perf_counter()
        for attempt in range(self.cfg.max_retries + 1):
            try:
                out = self.transport.run_layer(layer, tokens, expert_ids)
                self._step_dispatch_s += time.perf_counter() - started
                return out
            except ExpertWorkerDied as exc:
                if attempt == self.cfg.max_retries:
                    raise
                logger.warning("%s; failing over (attempt %d)", exc, attempt + 1)
                self.fail_over(exc.worker)
                self.transport.stats.retries += 1
        raise AssertionError("unreachable")

    # ---- control plane ---------------------------------------------------------------------
    def _switch(self, new: ExpertPlacement) -> None:
        """Load every new assignment first, then switch; in-flight steps keep the old placement."""
        import ray

        ray.get([self.workers[w].load.remote(new.assignments(w)) for w in sorted(self.alive)])
        self.placement = new
        self.transport.set_placement(new)

    def fail_over(self, dead: int) -> None:
        import ray

        self.alive.discard(dead)
        self.transport.drop_worker(dead)
        with_dead_removed = self.placement.without_worker(dead, self.tracker.loads())
        self._switch(with_dead_removed)
        self.failovers += 1
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.workers[dead])
        if self.cfg.replace_dead_workers and not isinstance(self.transport, CollectiveTransport):
            # Started now, loaded in the background; the step loop switches to it once loaded.
            replacement = self._spawn(dead)
            self._replacing[dead] = (replacement, replacement.load.remote(self.home.assignments(dead)))

    def _finish_replacements(self) -> None:
        """Between steps: a replacement that has loaded its experts takes its index back, and the
        experts move back to where they were before the failure."""
        import ray

        refs = [ref for _, ref in self._replacing.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for worker, (replacement, ref) in list(self._replacing.items()):
            if ref not in ready:
                continue
            del self._replacing[worker]
            try:
                ray.get(ref)
            except Exception as exc:  # it died too, or could not load: stay failed over
                logger.warning("replacement of expert worker %d failed: %r", worker, exc)
                continue
            self.workers[worker] = replacement
            self.alive.add(worker)
            self.transport.add_worker(worker)
            self._switch(self.home)
            self.replacements += 1
            logger.warning("expert worker %d replaced; its experts are back on it", worker)

    def end_step(self) -> float:
        dispatch_s, self._step_dispatch_s = self._step_dispatch_s, 0.0
        self.tracker.end_step()
        self.steps += 1
        if self._replacing:
            self._finish_replacements()
        rb = self.cfg.rebalance
        if rb.enabled and self.steps % rb.interval_steps == 0 and self.imbalance() > rb.imbalance_threshold:
            self.rebalance()
        return dispatch_s

    def rebalance(self) -> ExpertPlacement:
        """Replicate hot experts and repack by load over the live workers; load, then switch."""
        alive = sorted(self.alive)
        loads = self.tracker.loads()
        slots = (
            math.ceil(self.spec.text.num_local_experts / len(alive))
            + self.cfg.rebalance.redundant_slots_per_worker
        )
        compact = ExpertPlacement(
            len(alive),
            self.placement.moe_layers,
            self.placement.num_experts,
            {
                layer: tuple((0,) for _ in range(self.placement.num_experts))
                for layer in self.placement.moe_layers
            },
        )
        balanced = rebalanced(compact, loads, slots)
        mapped = {
            layer: tuple(tuple(alive[w] for w in ws) for ws in row)
            for layer, row in balanced.replicas.items()
        }
        new = self.placement.with_replicas(mapped)
        self._switch(new)
        self.rebalances += 1
        return new

    def imbalance(self) -> float:
        return self.tracker.imbalance(self.placement)

    def stats(self) -> dict[str, object]:
        return {
            "expert_imbalance": self.imbalance(),
            "expert_tokens": self.tracker.loads(),
            "expert_rebalances_total": self.rebalances,
            "expert_failovers_total": self.failovers,
            "expert_replacements_total": self.replacements,
        }

    def shutdown(self) -> None:
        import ray

        if isinstance(self.transport, RayCompiledTransport):
            self.transport.close()
        if isinstance(self.transport, CollectiveTransport):
            import torch.distributed as dist

            self.transport.stop_workers()
            ray.get(self._serving, timeout=30)
            dist.destroy_process_group()
        if self.registry is not None:
            self.release()  # other engines of the group may still use its workers
            return
        for w in self.workers:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(w)
        ray.util.remove_placement_group(self.group)
