"""vLLM's per-iteration stats folded into our `EngineStats`.

vLLM hands every stat logger a `SchedulerStats` (queue, KV usage, prefix-cache counters) and an
`IterationStats` (tokens, preemptions, finished requests) in its output handler, on the replica's
event loop. `StatsCollector` keeps running totals there; `snapshot()` reads them from any thread
(plain ints and floats, replaced atomically).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from maverick_serve.engine.types import EngineStats

# The one KV group name we report for vLLM (its hybrid groups share one block pool).
VLLM_KV_GROUP = "vllm"
RATE_WINDOW_S = 10.0


class StatsCollector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.num_blocks = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_prompt_tokens = 0
        self.steps = 0
        self.preemptions = 0
        self.rates: deque[tuple[float, int, int]] = deque()

    def record(self, scheduler: Any, iteration: Any) -> None:
        with self.lock:
            if scheduler is not None:
                self.running = int(scheduler.num_running_reqs)
                self.waiting = int(scheduler.num_waiting_reqs)
                self.kv_usage = float(scheduler.kv_cache_usage)
            if iteration is not None:
                self.steps += 1
                prompt = iteration.prompt_token_stats
                self.prompt_tokens += int(prompt.computed)
                self.cached_prompt_tokens += int(prompt.cached_tokens)
                self.generated_tokens += int(iteration.num_generation_tokens)
                self.preemptions += int(iteration.num_preempted_reqs)
                now = time.monotonic()
                self.rates.append((now, self.prompt_tokens, self.generated_tokens))
                while self.rates and now - self.rates[0][0] > RATE_WINDOW_S:
                    self.rates.popleft()

    def snapshot(self) -> EngineStats:
        with self.lock:
            prefill_rate = decode_rate = 0.0
            if len(self.rates) > 1:
                (t0, p0, g0), (t1, p1, g1) = self.rates[0], self.rates[-1]
                if t1 > t0:
                    prefill_rate, decode_rate = (p1 - p0) / (t1 - t0), (g1 - g0) / (t1 - t0)
            used = round(self.kv_usage * self.num_blocks)
            return EngineStats(
                running=self.running,
                waiting=self.waiting,
                kv_blocks_total={VLLM_KV_GROUP: self.num_blocks},
                kv_blocks_used={VLLM_KV_GROUP: used},
                kv_blocks_free={VLLM_KV_GROUP: self.num_blocks - used},
                prefix_cache_hit_tokens=self.cached_prompt_tokens,
                prompt_tokens_total=self.prompt_tokens + self.cached_prompt_tokens,
                generated_tokens_total=self.generated_tokens,
                prefill_tokens_per_s=prefill_rate,
                decode_tokens_per_s=decode_rate,
                steps_total=self.steps,
                preemptions_total=self.preemptions,
            )


class CollectingStatLogger(StatLoggerBase):
    """A vLLM stat logger that only feeds a `StatsCollector` (vLLM's own Prometheus logger is off:
    our metrics catalogue exports the figures under our names)."""

    def __init__(
        self, vllm_config: Any, engine_index: int = 0, collector: StatsCollector | None = None
    ) -> None:
        self.collector = collector or StatsCollector()

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
        **_: Any,
    ) -> None:
        self.collector.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        pass
