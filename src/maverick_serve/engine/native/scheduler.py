"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first (decodes and unfinished prefills, in arrival order), then
waiting sequences are admitted while budget, sequence slots and KV blocks last. A prefill
longer than the remaining budget is split across steps. When KV blocks run out, the most
recently admitted running sequence is preempted (its blocks freed, recomputed later), so the
oldest requests always make progress.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from maverick_serve.engine.native.kv_cache import KVCacheManager
from maverick_serve.engine.native.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.end == self.seq.num_tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_hit_tokens = 0
        # Admission hook of an external KV tier: (seq, local hit) → tokens it loaded, or 0.
        self.external_prefix: Callable[[Sequence, int], int] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.blocks)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.admitted = False
        seq.image_features = None
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            start = seq.num_computed
            n = min(seq.num_tokens - start, budget)
            while not self.kv.can_allocate(seq.blocks, start, start + n):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            if not self.kv.can_allocate(seq.blocks, start, start + n):
                break
            self.kv.allocate(seq.blocks, start, start + n)
            chunks.append(ScheduledChunk(seq, start, n))
            scheduled.add(id(seq))
            budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.admitted:
                hashes = seq.update_block_hashes(self.kv.block_size)
                hit = self.kv.longest_cached_prefix(hashes, seq.num_tokens - 1)
                if not self.kv.can_allocate(seq.blocks, hit, min(seq.num_tokens, hit + budget)):
                    hit = 0
                external = 0
                if self.external_prefix and not seq.output_ids:
                    probe = time.monotonic()
                    external = self.external_prefix(seq, hit)
                    seq.timing.tier_lookup_s += time.monotonic() - probe
                    seq.timing.tier_hit_tokens = max(0, external - hit)
                if external > hit:
                    hit = external  # the tier allocated and filled the blocks
                    self.kv.register_full_blocks(seq.blocks, hashes, hit)
                elif hit:
                    self.kv.acquire_prefix(seq.blocks, hashes, hit)
                seq.num_computed = hit
                if not seq.output_ids:
                    seq.num_cached_prompt = hit
                    self.prefix_hit_tokens += hit
                seq.admitted = True
            start = seq.num_computed
            n = min(seq.num_tokens - start, budget)
            if not self.kv.can_allocate(seq.blocks, start, start + n):
                break
            self.kv.allocate(seq.blocks, start, start + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.timing.first_scheduled is None:
                seq.timing.first_scheduled = time.monotonic()
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, start, n))
            budget -= n
        return chunks
