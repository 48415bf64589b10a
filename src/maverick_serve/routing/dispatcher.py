"""The router's replica choice and delivery: state polling, policy, backpressure, retries.

`Dispatcher.open` prices a request, asks the policy for a ranking, sends the work items with the
ranking attached and waits for each choice's first event. A replica that fails before the first
token (died, engine down, stream closed) is marked failed and the request goes to the next
choice, up to `routing.max_retries` times; 4xx answers are final. The policy ranks only the
replicas admission control lets the request join (`routing/admission.py`: its predicted wait fits
its deadline, within the memory bounds); when none does it is refused with 429 and a Retry-After
from the replicas' drain rates instead of queueing past its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from maverick_serve.api.engine_client import EngineClient
from maverick_serve.api.errors import APIError
from maverick_serve.api.protocol import EngineWorkItem
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.model.image_processing import ImageProcessingConfig, decode_image, pixel_content_hash
from maverick_serve.observability.tracing import background_task, step
from maverick_serve.routing.admission import Admission, Verdict, retry_after
from maverick_serve.routing.cost import CostModel, RequestCost
from maverick_serve.routing.metrics import RouterMetrics
from maverick_serve.routing.policy import Decision, make_policy
from maverick_serve.routing.publisher import StateChannel
from maverick_serve.routing.state import ClusterView, ReplicaEntry

logger = logging.getLogger(__name__)
Stream = AsyncGenerator[dict[str, Any], None]


class ImageHasher:
    """Pixel content hashes as the engine computes them (decoded RGB), memoised by the encoded
    bytes' SHA-256 so a repeated image costs one hash of its file, not a decode."""

    def __init__(self, cfg: ImageProcessingConfig, capacity: int = 4096) -> None:
        self.cfg = cfg
        self.capacity = capacity
        self.memo: OrderedDict[bytes, str] = OrderedDict()

    def __call__(self, data: bytes) -> str:
        key = hashlib.sha256(data).digest()
        found = self.memo.get(key)
        if found is None:
            found = self.memo[key] = pixel_content_hash(decode_image(data, self.cfg))
            while len(self.memo) > self.capacity:
                self.memo.popitem(last=False)
        else:
            self.memo.move_to_end(key)
        return found


@dataclass
class Opened:
    streams: list[Stream]
    firsts: list[dict[str, Any]]
    replica: str | None  # where it runs (from the first event)
    predicted: str | None  # where the policy sent it (for load accounting)
    cost: RequestCost
    retries: int
    forecast_s: float | None = None  # admission's predicted time to finish on `predicted`, when sent
    settled: bool = False  # load accounting and hit metrics done


def _retryable(event: dict[str, Any]) -> bool:
    return "error" in event and int(event["error"].get("status", 500)) >= 500


async def _first_event(stream: Stream) -> dict[str, Any]:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return {"error": {"status": 503, "message": "engine replica closed the stream", "param": None}}
    except Exception as exc:  # the replica died or is unreachable
        return {"error": {"status": 503, "message": f"engine replica failed: {exc!r}"[:500], "param": None}}


class Dispatcher:
    def __init__(
        self,
        cfg: ClusterConfig,
        spec: ModelSpec,
        engine: EngineClient,
        channel: StateChannel | None,
        image_cfg: ImageProcessingConfig,
        capacity_coming: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        # True while more engine replicas are starting: a full tier then waits instead of 429.
        self.capacity_coming = capacity_coming
        self.routing = cfg.router.routing
        self.engine = engine
        self.channel = channel
        self.view = ClusterView(self.routing)
        self.policy = make_policy(self.routing, cfg.engine.block_size, cfg.kvtier.block_size)
        self.admission = Admission(self.routing)
        self.costs = CostModel(spec, cfg.engine.block_size, cfg.kvtier.block_size)
        self.hash_image = ImageHasher(image_cfg)
        self.metrics = RouterMetrics(self.policy.name)
        self._poller: asyncio.Task[None] | None = None
        self._first_poll = asyncio.Event()
        self._polled_at = -math.inf  # monotonic time of the last poll the hub answered

    # ---- replica state ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start polling the hub (once, on the serving loop) and wait briefly for a first view."""
        if self.channel is None:
            return
        if self._poller is None:
            self._poller = background_task(self._poll_loop())
            # Only the first request waits: with the hub down, later ones must not each pay 1 s.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_poll.wait(), timeout=1.0)

    async def _poll_loop(self) -> None:
        assert self.channel is not None
        failures = 0
        while True:
            try:
                update = await self.channel.poll(self.view.epoch, self.view.cursor)
                self.view.apply(update)
                self._polled_at = time.monotonic()
                self._first_poll.set()
                self.metrics.queues({e.replica: e.queued() for e in self.view.replicas.values()})
                failures = 0
            except Exception as exc:  # the hub restarting must not stop routing
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("replica state poll failed (%d in a row): %r", failures, exc)
            await asyncio.sleep(self.routing.state_interval_s)

    def _hub_silent(self) -> bool:
        # Sooner than entries expire (state_expiry_s after the replica's last report, which the
        # hub's answers lag): a dead hub must not open a window where every replica looks gone.
        silent_after = min(self.routing.state_expiry_s, max(1.0, 3 * self.routing.state_interval_s))
        return self.channel is not None and time.monotonic() - self._polled_at > silent_after

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    # ---- pricing and choice ---------------------------------------------------------------------
    def price(
        self, prompt: list[int], images: list[bytes], session: str | None, max_tokens: int | None = None
    ) -> RequestCost:
        hashes = [self.hash_image(data) for data in images]
        return self.costs.cost(
            prompt, hashes, session, with_tier=self.cfg.kvtier.enabled, max_tokens=max_tokens or 0
        )

    def choose(self, cost: RequestCost, seats: int = 1, budget_s: float | None = None) -> Decision:
        """Rank the replicas that admit `cost` on `seats` sequences with `budget_s` seconds left
        to its deadline (default: the whole router.request_timeout_s)."""
        if not self.view.replicas or self._hub_silent():
            # No state (just started, no hub) or none fresh because the hub itself stopped
            # answering (restarting): Serve's own choice, not a 503 for replicas that may be fine.
            return Decision([], "no_state", 0)
        alive = self.view.alive()
        if not alive:
            # Not overload: every replica failed or went silent (a dead engine, a crashed node).
            raise APIError(
                503,
                f"no engine replica is up ({len(self.view.replicas)} failed or stopped reporting); "
                "Serve replaces failed replicas, retry shortly",
                None,
                "unavailable",
                {"retry-after": str(self.routing.retry_after_s)},
            )
        budget = self.cfg.router.request_timeout_s if budget_s is None else budget_s
        return self.policy.choose(self.view, cost, self._admitted(alive, cost, seats, budget))

    def _admitted(
        self, alive: list[ReplicaEntry], cost: RequestCost, seats: int, budget_s: float
    ) -> list[ReplicaEntry]:
        """The replicas that admit `cost`; 429 with Retry-After when none does."""
        verdicts = [self.admission.verdict(e, cost, seats, budget_s) for e in alive]
        admitted = [e for e, v in zip(alive, verdicts, strict=True) if v.admit]
        if not admitted:
            raise APIError(
                429,
                self._refusal(verdicts, budget_s),
                None,
                "overloaded",
                {"retry-after": str(retry_after(verdicts, self.routing.retry_after_s))},
            )
        return admitted

    def refuse_early(self, max_tokens: int | None, seats: int) -> None:
        """Before the prompt is built (chat template, tokenizer, image fetches: most of what a
        refusal costs the router's CPU, which past capacity is what the admitted requests need):
        429 where no replica would admit even an empty prompt. A real prompt only costs more, so
        nothing refused here would have been admitted. Leaves every other answer to `choose`."""
        if self.capacity_coming is not None and self.capacity_coming():
            return  # choose_or_wait waits for the replicas that are starting
        if not self.view.replicas or self._hub_silent():
            return
        alive = self.view.alive()
        if alive:
            cost = RequestCost(prompt_tokens=0, max_tokens=max_tokens or 0)
            try:
                self._admitted(alive, cost, seats, self.cfg.router.request_timeout_s)
            except APIError:
                self.metrics.rejection("all_replicas_full")
                raise

    def _refusal(self, verdicts: list[Verdict], budget_s: float) -> str:
        r = self.routing
        reasons = {v.reason for v in verdicts}
        if reasons == {"queue_full"}:
            return (
                f"every engine replica has router.routing.max_queue_per_replica={r.max_queue_per_replica} "
                "requests waiting; retry later"
            )
        if reasons == {"tokens_full"}:
            return (
                "every engine replica has router.routing.max_queued_tokens_per_replica="
                f"{r.max_queued_tokens_per_replica} prompt tokens queued; retry later"
            )
        waits = [v.wait_s for v in verdicts if v.wait_s is not None]
        shortest = f"{min(waits):.1f} s" if waits else "unknown"
        return (
            f"no engine replica can start this request within its deadline: shortest predicted queue "
            f"wait {shortest}, {budget_s:.1f} s left of router.request_timeout_s="
            f"{self.cfg.router.request_timeout_s:g}; retry later"
        )

    # ---- delivery ---------------------------------------------------------------------------------
    async def choose_or_wait(
        self, cost: RequestCost, seats: int = 1, deadline: float | None = None
    ) -> Decision:
        """`choose`, but while the tier is full and replicas are starting (the autoscaler asked
        for them), wait for one up to `routing.scale_up_wait_s` instead of refusing. `deadline` is
        the request's, in event-loop time."""
        loop = asyncio.get_running_loop()
        waited, step = 0.0, min(0.25, self.routing.state_interval_s)
        while True:
            budget = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                return self.choose(cost, seats, budget)
            except APIError as exc:
                coming = self.capacity_coming is not None and self.capacity_coming()
                if exc.status != 429 or not coming or waited >= self.routing.scale_up_wait_s:
                    self.metrics.rejection("all_replicas_full" if exc.status == 429 else "no_replica_up")
                    raise
            await asyncio.sleep(step)
            waited += step

    async def open(
        self, items: list[EngineWorkItem], cost: RequestCost, deadline: float | None = None
    ) -> Opened:
        retries = 0
        while True:
            with step("router.choose", **{"maverick.route.policy": self.policy.name}) as span:
                decision = await self.choose_or_wait(cost, len(items), deadline)
                predicted = decision.ranked[0] if decision.ranked else None
                span.set_attributes(
                    {
                        "maverick.route.reason": decision.reason,
                        "maverick.route.replica": predicted or "serve",
                        "maverick.route.predicted_hit_tokens": decision.predicted_hit_tokens,
                    }
                )
            uncached = max(0.0, cost.work - decision.predicted_hit_tokens) * len(items)
            image_work = cost.image_tokens + cost.vision_work
            entry = self.view.replicas.get(predicted) if predicted is not None else None
            forecast = self.admission.forecast_s(entry, cost, len(items)) if entry is not None else None
            if predicted is not None:
                self.view.on_sent(predicted, uncached, image_work)
            routed = [item.model_copy(update={"route": decision.ranked}).model_dump() for item in items]
            streams = [self.engine.stream(item) for item in routed]
            try:
                firsts = list(await asyncio.gather(*(_first_event(s) for s in streams)))
            except BaseException:  # deadline or client gone: abort what was sent
                for s in streams:
                    with contextlib.suppress(Exception):
                        await s.aclose()
                if predicted is not None:
                    self.view.on_started(predicted, uncached)
                    self.view.on_finished(predicted, image_work)
                raise
            replica = next((str(f["replica"]) for f in firsts if f.get("replica")), None)
            for f in firsts:
                self.view.observe_load(f.get("replica"), f.get("load"))
            if predicted is not None:
                self.view.on_started(predicted, uncached)
            failed = next((f for f in firsts if _retryable(f)), None)
            if failed is None or retries >= self.routing.max_retries:
                if failed is None:
                    self.metrics.decision(
                        decision.reason,
                        replica or "?",
                        decision.predicted_hit_tokens,
                        cost.prompt_tokens,
                        cost.image_tokens,
                    )
                return Opened(streams, firsts, replica, predicted, cost, retries, forecast)
            for s in streams:
                await s.aclose()
            if predicted is not None:
                self.view.on_finished(predicted, image_work)
            bad = replica or predicted
            if bad is not None:
                self.view.mark_failed(bad)
            logger.warning("replica %s failed before the first token (%s); retrying", bad, failed["error"])
            retries += 1
            self.metrics.retry()

    def finished(self, opened: Opened, usage: dict[str, Any] | None) -> None:
        """Settle a request once (idempotent): image work off its replica, cache hits counted."""
        if opened.settled:
            return
        opened.settled = True
        if opened.predicted is not None:
            self.view.on_finished(opened.predicted, opened.cost.image_tokens + opened.cost.vision_work)
        if usage:
            self.metrics.actual_hit(int(usage.get("cached_tokens", 0)))
