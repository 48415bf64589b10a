"""Admission control: may a request join a replica's queue and still finish within its deadline?

A replica reports its queue (waiting and running requests, prompt tokens not yet computed) and
what its engine measured over the last seconds of step time (prompt tokens per second while
prefilling, mean step time, requests finished per second). From those the router predicts how
long a new request would wait there before its first step:

    prefill wait = (queued prompt tokens + work this router sent but the replica has not
                    started) / prompt tokens per second
    seat wait    = requests that must leave before it gets a seat (waiting + sent + 1 − free
                   seats) / requests finished per second

and how long it then runs itself (its prompt at the same rate, plus `max_tokens` decode steps
when the client set it, each as long as the engine's step-time model predicts for the batch it
joins: the requests running and queued there, up to the engine's seats, and at least the batch it
ran at lately; a mean step time measured while few requests ran would let a burst in that then
misses its deadline together). The request is admitted where wait + own time fits the time left
to its deadline (times `routing.deadline_headroom`). The sum over-predicts (prefill and seats
partly overlap): near the limit it refuses a little early rather than admit work that times out.

Only when no live replica admits does the router answer 429, with a `Retry-After` of the
shortest time any replica needs to drain enough (queues drain in real time). Two bounds hold
whatever the prediction says, because they protect memory rather than latency: requests waiting
per replica and queued prompt tokens per replica. A replica that has not measured its rates yet
(just started, or an engine that reports none) is bounded by those two alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maverick_serve.config.routing import RoutingConfig
from maverick_serve.routing.cost import RequestCost
from maverick_serve.routing.state import ReplicaEntry

MAX_RETRY_AFTER_S = 600


@dataclass(frozen=True)
class Verdict:
    admit: bool
    wait_s: float | None  # predicted wait before the first step (None: rates not measured)
    retry_after_s: float | None  # when refused: seconds until this replica would admit it
    reason: str  # admitted | queue_full | tokens_full | deadline


def predicted_wait_s(entry: ReplicaEntry, seats_needed: int = 1) -> float | None:
    """Seconds a request sent now would wait on `entry` before its first step."""
    load = entry.load
    if load.step_s <= 0:
        return None
    prefill = entry.pending_work() / load.prefill_tokens_per_s if load.prefill_tokens_per_s > 0 else 0.0
    seats = 0.0
    if load.max_num_seqs > 0:
        free = max(0, load.max_num_seqs - load.running)
        ahead = entry.queued() + seats_needed - free
        # Nothing finished in the engine's window yet (a cold start, or every request longer
        # than the window): the seat wait is unknown and the prefill wait alone is predicted.
        if ahead > 0 and load.finished_per_s > 0:
            seats = ahead / load.finished_per_s
    return prefill + seats


class Admission:
    def __init__(self, cfg: RoutingConfig) -> None:
        self.cfg = cfg

    def own_time_s(self, entry: ReplicaEntry, cost: RequestCost, seats: int = 1) -> float:
        """The request's own prefill and decode on `entry` once it starts (0 if not measured),
        its decode steps at the batch it joins: every request there and queued, up to the seats,
        and at least the batch the replica ran at lately (under a sustained load, arrivals after
        it fill a batch that is momentarily small, and every step slows)."""
        load = entry.load
        prefill = cost.work / load.prefill_tokens_per_s if load.prefill_tokens_per_s > 0 else 0.0
        batch = max(load.running + entry.queued() + seats, math.ceil(load.batch_p90))
        if load.max_num_seqs > 0:
            batch = min(batch, load.max_num_seqs)
        return prefill + cost.max_tokens * load.step_at(batch)

    def forecast_s(self, entry: ReplicaEntry, cost: RequestCost, seats: int = 1) -> float | None:
        """Seconds from now until `cost` would finish on `entry` (None: rates not measured)."""
        wait = predicted_wait_s(entry, seats)
        return None if wait is None else wait + self.own_time_s(entry, cost, seats)

    def verdict(self, entry: ReplicaEntry, cost: RequestCost, seats: int, budget_s: float) -> Verdict:
        """May `cost` (on `seats` sequences: the request's `n`) join `entry` with `budget_s`
        seconds left to its deadline?"""
        cfg = self.cfg
        load = entry.load
        queued = entry.queued()
        if queued + seats > cfg.max_queue_per_replica:
            drain = load.finished_per_s
            after = (queued + seats - cfg.max_queue_per_replica) / drain if drain > 0 else None
            return Verdict(False, None, after, "queue_full")
        pending = entry.pending_work()
        work = cost.work * seats
        if pending > 0 and pending + work > cfg.max_queued_tokens_per_replica:
            rate = load.prefill_tokens_per_s
            after = (pending + work - cfg.max_queued_tokens_per_replica) / rate if rate > 0 else None
            return Verdict(False, None, after, "tokens_full")
        wait = predicted_wait_s(entry, seats) if cfg.admit_by_predicted_wait else None
        if wait is None:
            return Verdict(True, None, None, "admitted")
        over = wait + self.own_time_s(entry, cost, seats) - cfg.deadline_headroom * budget_s
        # An idle replica always admits: the request alone is the best it can do.
        if over > 0 and (queued > 0 or pending > 0):
            return Verdict(False, wait, over, "deadline")
        return Verdict(True, wait, None, "admitted")


def retry_after(verdicts: list[Verdict], default_s: int) -> int:
    """Whole seconds until the first replica would admit (the configured default where no
    replica can tell)."""
    known = [v.retry_after_s for v in verdicts if v.retry_after_s is not None]
    if not known:
        return default_s
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(min(known))))
