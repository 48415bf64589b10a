"""The KV tier's circuit breaker: a stalled or dead store costs one timeout, not one per request.

Closed: calls go to the store. The first call that fails or times out opens it: lookups answer
"miss" at once (the request prefills as on a miss) and stores are dropped. While open, a probe
(a PING on the tier's I/O thread, off every request's path) runs after each backoff period —
doubling up to a cap — and the first one that answers closes the breaker again. State changes
are logged once each and counted in the tier's stats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(
        self,
        backoff_s: float,
        max_backoff_s: float,
        probe: Callable[[], bool],
        on_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.probe = probe  # True when the store answers (run on a background thread)
        self.on_change = on_change or (lambda _state: None)
        self.clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._wait_s = backoff_s
        self._probing = False
        self._next_probe = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self) -> bool:
        """Whether a call may go to the store now; while open, starts a due probe."""
        if not self._open:
            return True
        start = False
        with self._lock:
            if self._open and not self._probing and self.clock() >= self._next_probe:
                self._probing = start = True
        if start:
            threading.Thread(target=self._run_probe, name="kvtier-probe", daemon=True).start()
        return False

    def failure(self, reason: BaseException | str) -> None:
        with self._lock:
            if self._open:
                return
            self._open = True
            self._wait_s = self.backoff_s
            self._next_probe = self.clock() + self._wait_s
        logger.warning("KV tier unhealthy (%s): skipping it, probing every %.1f s", reason, self.backoff_s)
        self.on_change("open")

    def _run_probe(self) -> None:
        ok = False
        try:
            ok = self.probe()
        except Exception:  # a probe that raises is a failed probe
            ok = False
        with self._lock:
            self._probing = False
            if ok:
                self._open = False
            else:
                self._wait_s = min(self._wait_s * 2, self.max_backoff_s)
                self._next_probe = self.clock() + self._wait_s
        if ok:
            logger.warning("KV tier answers again: using it")
            self.on_change("closed")
