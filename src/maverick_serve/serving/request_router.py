"""Serve's replica choice for the engine deployment: follow the router's ranking.

The Router ingress scores replicas with its `RoutingPolicy` and sends the ranking with the
request (`item["route"]`, replica ids best first). This class, configured as the engine
deployment's `request_router_class`, turns it into Serve's ranks: Serve tries the first replica
and moves down the list when a replica is at `max_ongoing_requests` or gone. Requests without
a ranking (no replica state yet) go to the least-loaded replica, as Serve's default does.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RankedRequestRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        route: Any = None
        if pending_request is not None and pending_request.args:
            item = pending_request.args[0]
            route = item.get("route") if isinstance(item, dict) else None
        if not route:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = [[by_id[name]] for name in route if name in by_id]
        ranked = set(route)
        rest = [r for r in candidate_replicas if r.replica_id.unique_id not in ranked]
        return [*ranks, rest] if rest else ranks
