"""Replica-side signals for autoscaling: p95 of recent latencies, rates over a window."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable


class LatencyWindow:
    """Samples of one latency (seconds) over the last `window_s`; `p95()` is None without samples,
    so a quiet replica never looks slow. Bounded: at most `max_samples` are kept."""

    def __init__(
        self, window_s: float, max_samples: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self.samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self.lock = threading.Lock()  # added on the event loop, read on Serve's metrics thread

    def add(self, seconds: float) -> None:
        with self.lock:
            self.samples.append((self.clock(), seconds))

    def p95(self) -> float | None:
        now = self.clock()
        with self.lock:
            while self.samples and now - self.samples[0][0] > self.window_s:
                self.samples.popleft()
            values = sorted(v for _, v in self.samples)
        if not values:
            return None
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


class RateWindow:
    """Amounts added over the last `window_s`, per second (e.g. long-prompt tokens admitted)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.events: deque[tuple[float, float]] = deque()
        self.total = 0.0
        self.lock = threading.Lock()

    def add(self, amount: float) -> None:
        with self.lock:
            self.events.append((self.clock(), amount))
            self.total += amount

    def per_s(self) -> float:
        now = self.clock()
        with self.lock:
            while self.events and now - self.events[0][0] > self.window_s:
                self.total -= self.events.popleft()[1]
            return max(0.0, self.total) / self.window_s
