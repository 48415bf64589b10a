"""Whether the prefill tier has a running replica, so a router never waits on a tier scaled to zero.

With `autoscaling.prefill.min_replicas: 0` the prefill deployment may have no replica; a request
sent to it then waits for a cold start. Instead the router lets the engine prefill the prompt
itself and reports the prompt's tokens as prefill demand (the autoscaler starts prefill replicas
from that). The count comes from Serve's public `serve.status()`, refreshed in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status is not None else None
    if dep is None:
        return 0
    return sum(
        n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING"
    )


class PrefillAvailability:
    def __init__(
        self,
        app: str,
        deployment: str,
        always: bool,
        interval_s: float = 2.0,
        count: Callable[[str, str], int] = running_replicas,
    ) -> None:
        self.app, self.deployment = app, deployment
        self.always = always  # a fixed-size prefill tier is always there
        self.interval_s = interval_s
        self.count = count
        self.running = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.always and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._refresh())

    def available(self) -> bool:
        return self.always or self.running > 0

    async def _refresh(self) -> None:
        while True:
            try:
                self.running = await asyncio.to_thread(self.count, self.app, self.deployment)
            except Exception as exc:  # the controller restarting: keep the last count
                logger.debug("prefill replica count unavailable: %r", exc)
            await asyncio.sleep(self.interval_s)

    def close(self) -> None:
        if self.task is not None:
            with contextlib.suppress(RuntimeError):
                self.task.cancel()
