"""Replica counts of a deployment, as a router needs them under autoscaling.

- Prefill: with `autoscaling.prefill.min_replicas: 0` the prefill deployment may have no replica;
  a request sent to it would wait for a cold start. Instead the router lets the engine prefill the
  prompt itself and reports the prompt's tokens as prefill demand (the autoscaler starts prefill
  replicas from that).
- Engine: when every engine replica is full but more are starting, the router waits for them
  instead of answering 429 (`router.routing.scale_up_wait_s`).

The counts come from Serve's public `serve.status()`, refreshed in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from maverick_serve.observability.tracing import background_task

logger = logging.getLogger(__name__)


def replica_counts(app: str, deployment: str) -> dict[str, int]:
    """Replicas of `deployment` by state (RUNNING, STARTING, ...)."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status is not None else None
    if dep is None:
        return {}
    return {str(getattr(state, "value", state)): n for state, n in dep.replica_states.items()}


class ReplicaWatch:
    """`always`: a fixed-size tier, nothing to watch (available, nothing starting)."""

    def __init__(
        self,
        app: str,
        deployment: str,
        always: bool,
        interval_s: float = 2.0,
        count: Callable[[str, str], dict[str, int]] = replica_counts,
    ) -> None:
        self.app, self.deployment = app, deployment
        self.always = always
        self.interval_s = interval_s
        self.count = count
        self.counts: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.always and self.task is None:
            self.task = background_task(self._refresh())

    def available(self) -> bool:
        """A replica runs (a prefill tier at zero is not available)."""
        return self.always or self.counts.get("RUNNING", 0) > 0

    def starting(self) -> bool:
        """Replicas the autoscaler asked for are on their way."""
        return not self.always and self.counts.get("STARTING", 0) > 0

    async def _refresh(self) -> None:
        while True:
            try:
                self.counts = await asyncio.to_thread(self.count, self.app, self.deployment)
            except Exception as exc:  # the controller restarting: keep the last count
                logger.debug("replica count of %s unavailable: %r", self.deployment, exc)
            await asyncio.sleep(self.interval_s)
