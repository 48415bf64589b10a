"""Replica counts of a deployment, as a router needs them under autoscaling.

- Prefill: with `autoscaling.prefill.min_replicas: 0` the prefill deployment may have no replica;
  a request sent to it would wait for a cold start. Instead the router lets the engine prefill the
  prompt itself and reports the prompt's tokens as prefill demand (the autoscaler starts prefill
  replicas from that).
  A fixed-size prefill tier is watched too: while its replicas are replaced (killed, node lost),
  long prompts are prefilled by the engines instead of waiting in the handle for a new replica.
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


def replica_counts(app: str, deployment: str) -> dict[str, int] | None:
    """Replicas of `deployment` by state (RUNNING, STARTING, ...); None where Serve does not
    know the deployment (yet)."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status is not None else None
    if dep is None:
        return None
    return {str(getattr(state, "value", state)): n for state, n in dep.replica_states.items()}


class ReplicaWatch:
    """`always`: nothing to watch (available, nothing starting). `assume_up`: whether the tier
    counts as available before the first count arrives (a tier that may be at zero does not)."""

    def __init__(
        self,
        app: str,
        deployment: str,
        always: bool,
        interval_s: float = 2.0,
        count: Callable[[str, str], dict[str, int] | None] = replica_counts,
        assume_up: bool = False,
    ) -> None:
        self.app, self.deployment = app, deployment
        self.always = always
        self.interval_s = interval_s
        self.count = count
        self.counts: dict[str, int] | None = None  # None: not counted yet
        self.assume_up = assume_up
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.always and self.task is None:
            self.task = background_task(self._refresh())

    def available(self) -> bool:
        """A replica runs (a prefill tier at zero is not available)."""
        if self.always:
            return True
        return self.assume_up if self.counts is None else self.counts.get("RUNNING", 0) > 0

    def starting(self) -> bool:
        """Replicas the autoscaler asked for are on their way."""
        return not self.always and (self.counts or {}).get("STARTING", 0) > 0

    async def _refresh(self) -> None:
        while True:
            try:
                counts = await asyncio.to_thread(self.count, self.app, self.deployment)
                if counts is None and self.counts is not None:  # it was there: say so once
                    logger.warning("Serve no longer lists %s in app %s", self.deployment, self.app)
                self.counts = counts
            except Exception as exc:  # the controller restarting: keep the last count
                logger.debug("replica count of %s unavailable: %r", self.deployment, exc)
            await asyncio.sleep(self.interval_s)
