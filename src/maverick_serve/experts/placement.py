"""Expert placement: which worker(s) hold each (MoE layer, expert).

Control-plane data only (no tensors). A placement is immutable; rebalancing and failover build a
new one and switch to it between engine steps, so a step never sees two placements.
"""

from __future__ import annotations

from dataclasses import dataclass

from maverick_serve.config.model import ModelSpec

BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}


class PlacementError(ValueError):
    """A placement that names unknown layers, experts or workers, or leaves an expert homeless."""


@dataclass(frozen=True)
class ExpertPlacement:
    """`replicas[layer][expert]` = sorted worker ids holding that expert (≥ 1 each)."""

    num_workers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    replicas: dict[int, tuple[tuple[int, ...], ...]]
    version: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise PlacementError(f"experts.ep_degree must be ≥ 1, got {self.num_workers}")
        if set(self.replicas) != set(self.moe_layers):
            unknown = sorted(set(self.replicas) - set(self.moe_layers))
            missing = sorted(set(self.moe_layers) - set(self.replicas))
            raise PlacementError(
                f"placement layers do not match the model's MoE layers: unknown {unknown}, "
                f"missing {missing} (MoE layers are {list(self.moe_layers)})"
            )
        for layer, experts in self.replicas.items():
            if len(experts) != self.num_experts:
                raise PlacementError(
                    f"layer {layer}: placement covers {len(experts)} experts, the model has "
                    f"{self.num_experts}"
                )
            for e, workers in enumerate(experts):
                if not workers:
                    raise PlacementError(f"layer {layer} expert {e} has no worker")
                bad = [w for w in workers if not 0 <= w < self.num_workers]
                if bad:
                    raise PlacementError(
                        f"layer {layer} expert {e} names workers {bad}; there are "
                        f"{self.num_workers} (0..{self.num_workers - 1})"
                    )

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def contiguous(cls, spec: ModelSpec, num_workers: int) -> ExpertPlacement:
        """Expert e of every layer on worker e * W // E: equal shares, no redundancy."""
        e_count = spec.text.num_local_experts
        if num_workers > e_count:
            raise PlacementError(
                f"experts.ep_degree={num_workers} exceeds the {e_count} routed experts per layer"
            )
        row = tuple((e * num_workers // e_count,) for e in range(e_count))
        return cls(num_workers, spec.text.moe_layers, e_count, {layer: row for layer in spec.text.moe_layers})

    @classmethod
    def from_explicit(
        cls, spec: ModelSpec, num_workers: int, entries: list[tuple[int, int, list[int]]]
    ) -> ExpertPlacement:
        """From (layer, expert, workers) entries; unnamed experts fall back to the contiguous layout."""
        base = cls.contiguous(spec, num_workers)
        rows = {layer: list(base.replicas[layer]) for layer in base.moe_layers}
        for layer, expert, workers in entries:
            if layer not in rows:
                raise PlacementError(
                    f"experts.placement names layer {layer}, which is not an MoE layer "
                    f"(MoE layers: {list(spec.text.moe_layers)})"
                )
            if not 0 <= expert < spec.text.num_local_experts:
                raise PlacementError(
                    f"experts.placement names expert {expert}; layers have "
                    f"{spec.text.num_local_experts} (0..{spec.text.num_local_experts - 1})"
                )
            rows[layer][expert] = tuple(sorted(set(workers)))
        return cls(num_workers, base.moe_layers, base.num_experts, {k: tuple(v) for k, v in rows.items()})

    def with_replicas(self, replicas: dict[int, tuple[tuple[int, ...], ...]]) -> ExpertPlacement:
        return ExpertPlacement(
            self.num_workers, self.moe_layers, self.num_experts, replicas, self.version + 1
        )

    # ---- queries ---------------------------------------------------------------------------
    def assignments(self, worker: int) -> dict[int, list[int]]:
        """layer → experts this worker must hold."""
        return {
            layer: [e for e, ws in enumerate(row) if worker in ws] for layer, row in self.replicas.items()
        }

    def without_worker(self, dead: int, loads: dict[int, list[float]] | None = None) -> ExpertPlacement:
        """Move a dead worker's experts to the least-loaded survivors (by expert load when known)."""
        alive = [w for w in range(self.num_workers) if w != dead]
        if not alive:
            raise PlacementError("every expert worker is dead")
        new: dict[int, tuple[tuple[int, ...], ...]] = {}
        for layer, row in self.replicas.items():
            layer_loads = (loads or {}).get(layer) or [1.0] * self.num_experts
            worker_load = {w: 0.0 for w in alive}
            for e, ws in enumerate(row):
                for w in ws:
                    if w != dead:
                        worker_load[w] += layer_loads[e] / len(ws)
            out = []
            for e, ws in enumerate(row):
                keep = tuple(w for w in ws if w != dead)
                if not keep:
                    target = min(alive, key=lambda w: (worker_load[w], w))
                    worker_load[target] += layer_loads[e]
                    keep = (target,)
                out.append(keep)
            new[layer] = tuple(out)
        return self.with_replicas(new)


def experts_per_worker(spec: ModelSpec, ep_degree: int, redundant_per_layer: int = 0) -> int:
    """Experts per layer on the busiest worker (contiguous layout + redundant copies)."""
    if ep_degree > spec.text.num_local_experts:
        raise PlacementError(
            f"ep={ep_degree} exceeds the {spec.text.num_local_experts} routed experts per layer"
        )
    return -(-(spec.text.num_local_experts + redundant_per_layer) // ep_degree)


def plan_worker_bytes(spec: ModelSpec, ep_degree: int, dtype: str, redundant_per_layer: int = 0) -> int:
    """Routed-expert weight bytes of the busiest worker (contiguous layout + redundant copies)."""
    t = spec.text
    per_expert = 3 * t.hidden_size * t.intermediate_size * BYTES_PER_PARAM[dtype]
    return per_expert * experts_per_worker(spec, ep_degree, redundant_per_layer) * len(t.moe_layers)


def dense_bytes(spec: ModelSpec, dtype: str) -> int:
    """Everything but the routed experts (attention, dense FFN, shared experts, embeddings, vision)."""
    t = spec.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    dense_ffn = 3 * t.hidden_size * t.intermediate_size_mlp
    shared = 3 * t.hidden_size * t.intermediate_size + t.hidden_size * t.num_local_experts
    n_moe = len(t.moe_layers)
    params = t.num_hidden_layers * attn + (t.num_hidden_layers - n_moe) * dense_ffn + n_moe * shared
    params += 2 * t.vocab_size * t.hidden_size
    return params * BYTES_PER_PARAM[dtype]
