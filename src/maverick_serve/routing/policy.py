"""Routing policies: weighted scorers and a picker.

Contract of `RoutingPolicy.choose(view, cost, candidates)`: return a `Decision` ranking
`candidates` (the live replicas admission control let the request join, never empty) best first,
with the reason the first won. It must not block and should take well under a millisecond with
64 replicas and millions of indexed blocks: it reads the `ClusterView`, it never calls out.

Scorers return values in [0, 1] per replica; the policy sums them with the configured weights
(`router.routing.weights`, or the named policy's defaults) and ranks by the sum. Ties go to the
replica with less pending work, then round robin.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

from maverick_serve.config.routing import PolicyName, RoutingConfig, ScorerWeights
from maverick_serve.routing.cost import RequestCost
from maverick_serve.routing.state import ClusterView, ReplicaEntry

NAMED_WEIGHTS: dict[str, ScorerWeights] = {
    "least_load": ScorerWeights(load=1.0),
    "cache_aware": ScorerWeights(prefix=1.0, tier=0.5, load=0.5, session=0.2),
    "multimodal_cache_aware": ScorerWeights(prefix=1.0, tier=0.5, load=0.5, image=1.0, session=0.2),
}


@dataclass
class Decision:
    ranked: list[str]  # replica names, best first
    reason: str  # what set the first apart: prefix, tier, load, image, session, tie, round_robin
    predicted_hit_tokens: int  # prompt tokens the first replica is expected to have cached


class RoutingPolicy(ABC):
    name: str

    @abstractmethod
    def choose(self, view: ClusterView, cost: RequestCost, candidates: list[ReplicaEntry]) -> Decision: ...


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self.counter = itertools.count()

    def choose(self, view: ClusterView, cost: RequestCost, candidates: list[ReplicaEntry]) -> Decision:
        open_ = sorted(candidates, key=lambda e: e.replica)
        start = next(self.counter) % len(open_)
        ranked = open_[start:] + open_[:start]
        return Decision([e.replica for e in ranked], "round_robin", 0)


class SessionMap:
    """session → replica that served it last (bounded LRU)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.map: OrderedDict[str, str] = OrderedDict()

    def get(self, session: str | None) -> str | None:
        if session is None:
            return None
        replica = self.map.get(session)
        if replica is not None:
            self.map.move_to_end(session)
        return replica

    def put(self, session: str | None, replica: str) -> None:
        if session is None:
            return
        self.map[session] = replica
        self.map.move_to_end(session)
        while len(self.map) > self.capacity:
            self.map.popitem(last=False)


class WeightedPolicy(RoutingPolicy):
    def __init__(
        self, name: str, weights: ScorerWeights, cfg: RoutingConfig, engine_block: int, tier_block: int
    ):
        self.name = name
        self.w = weights
        self.cfg = cfg
        self.engine_block = engine_block
        self.tier_block = tier_block
        self.sessions = SessionMap()
        self.tiebreak = itertools.count()

    def choose(self, view: ClusterView, cost: RequestCost, candidates: list[ReplicaEntry]) -> Decision:
        open_ = candidates
        w = self.w
        prompt = max(cost.prompt_tokens, 1)
        mask = 0
        for e in open_:
            mask |= e.bit
        local = view.local.prefix_blocks(cost.block_keys, mask) if w.prefix or w.tier else {}
        tier_own = view.tier.prefix_blocks(cost.tier_keys, mask) if w.tier else {}
        shared = view.shared_tier.prefix_blocks(cost.tier_keys, 1).get(1, 0) if w.tier else 0
        max_work = max(e.pending_work() for e in open_) + 1.0
        max_queue = max(e.queued() + e.load.running for e in open_) + 1.0
        image_load = {e.replica: view.image_load(e) for e in open_} if w.image else {}
        max_image = max(image_load.values(), default=0.0) + 1.0
        sticky = self.sessions.get(cost.session) if w.session else None
        turn = next(self.tiebreak)
        scored: list[tuple[float, float, int, ReplicaEntry, dict[str, float], int]] = []
        for i, e in enumerate(open_):
            hit = local.get(e.bit, 0) * self.engine_block
            tier_tokens = (shared if e.tier_shared else tier_own.get(e.bit, 0)) * self.tier_block
            parts = {
                "prefix": w.prefix * min(hit / prompt, 1.0),
                "tier": w.tier * self.cfg.tier_weight * max(0.0, min(tier_tokens, prompt) - hit) / prompt,
                "load": w.load
                * (1.0 - 0.5 * e.pending_work() / max_work - 0.5 * (e.queued() + e.load.running) / max_queue),
                "image": w.image * cost.image_share * (1.0 - image_load.get(e.replica, 0.0) / max_image),
                "session": w.session * (1.0 if sticky == e.replica else 0.0),
            }
            total = sum(parts.values())
            # Rank: score, then less pending work, then rotate so equal replicas share the load.
            scored.append((-total, e.pending_work(), (i - turn) % len(open_), e, parts, hit))
        scored.sort(key=lambda s: (s[0], s[1], s[2]))
        best_parts, best_hit = scored[0][4], scored[0][5]
        if len(scored) == 1:
            reason = "only_choice"
        elif scored[0][0] == scored[1][0]:
            reason = "tie"
        else:  # the scorer that separated the winner from the runner-up the most
            runner = scored[1][4]
            reason = max(best_parts, key=lambda k: best_parts[k] - runner[k])
        ranked = [s[3].replica for s in scored]
        self.sessions.put(cost.session, ranked[0])
        return Decision(ranked, reason, min(best_hit, cost.prompt_tokens))


def make_policy(cfg: RoutingConfig, engine_block: int, tier_block: int) -> RoutingPolicy:
    name: PolicyName = cfg.policy
    if name == "round_robin":
        return RoundRobinPolicy()
    weights = cfg.weights or NAMED_WEIGHTS[name]
    return WeightedPolicy(name, weights, cfg, engine_block, tier_block)
