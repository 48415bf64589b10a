"""Paged KV-cache bookkeeping: block pools per layer group, prefix caching, chunk retention.

Two layer groups share one block-id space each:
- `global` (NoPE layers) keeps a block for every token of the prefix;
- `chunked` (RoPE layers) only needs the blocks of the attention chunk that holds the queries,
  so blocks of finished chunks are released as soon as the sequence moves past them. For a long
  prompt this is what keeps RoPE layers at most one chunk deep.

Prefix caching: a full block is registered under a content hash chained over all previous
tokens (and image hashes). Released blocks stay cached (evictable, LRU) until reused.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from maverick_serve.model.attention import CHUNKED_GROUP, GLOBAL_GROUP

GROUPS = (CHUNKED_GROUP, GLOBAL_GROUP)


def flat_slots(table: list[int | None], block_size: int, start: int, end: int) -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of positions [start, end) through a block table."""
    first, last = start // block_size, (end + block_size - 1) // block_size
    blocks = table[first:last]
    assert all(b is not None for b in blocks), "positions outside the held blocks"
    base = torch.tensor(blocks, dtype=torch.long) * block_size
    slots = (base[:, None] + torch.arange(block_size)).flatten()
    return slots[start - first * block_size : end - first * block_size]


class BlockPool:
    """Fixed set of blocks with ref counts; free blocks form an LRU that may still be cached."""

    def __init__(self, num_blocks: int, events: deque[tuple[bool, bytes]] | None = None) -> None:
        self.num_blocks = num_blocks
        self.events = events  # (stored?, hash) for routers; None when nobody listens
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently released first
        old = self.hash_of[block]
        if old is not None:
            del self.cached[old]
            self.hash_of[block] = None
            if self.events is not None:
                self.events.append((False, old))
        self.ref[block] = 1
        return block

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def acquire_cached(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        if self.hash_of[block] is None and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash
            if self.events is not None:
                self.events.append((True, block_hash))


@dataclass
class BlockTables:
    """Per-request block ids by group; None marks a released (finished-chunk) block."""

    tables: dict[str, list[int | None]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    registered: dict[str, int] = field(default_factory=lambda: {g: 0 for g in GROUPS})

    def held(self, group: str) -> int:
        return sum(b is not None for b in self.tables[group])


class KVCacheManager:
    def __init__(
        self,
        blocks_per_group: dict[str, int],
        block_size: int,
        chunk_size: int,
        enable_prefix_caching: bool,
    ) -> None:
        if chunk_size % block_size:
            raise ValueError(
                f"engine.block_size ({block_size}) must divide the model's "
                f"attention_chunk_size ({chunk_size})"
            )
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = {g: BlockPool(blocks_per_group[g]) for g in GROUPS}

    def enable_cache_events(self, maxlen: int) -> deque[tuple[bool, bytes]]:
        """Record global-group blocks stored in and evicted from the prefix cache (the blocks a
        router can match a prompt against), for a publisher thread to drain."""
        pool = self.pools[GLOBAL_GROUP]
        if pool.events is None:
            pool.events = deque(maxlen=maxlen)
        return pool.events

    def chunk_start(self, position: int) -> int:
        return position - position % self.chunk_size

    def _first_needed_block(self, group: str, query_start: int) -> int:
        return self.chunk_start(query_start) // self.block_size if group == CHUNKED_GROUP else 0

    def longest_cached_prefix(self, block_hashes: list[bytes], max_tokens: int) -> int:
        """Tokens (a multiple of block_size, ≤ max_tokens) whose KV every group can supply."""
        if not self.enable_prefix_caching:
            return 0
        n = min(len(block_hashes), max_tokens // self.block_size)
        glob = self.pools[GLOBAL_GROUP]
        hit = 0
        while hit < n and glob.lookup(block_hashes[hit]) is not None:
            hit += 1
        chunked = self.pools[CHUNKED_GROUP]
        while hit > 0:
            first = self.chunk_start(hit * self.block_size) // self.block_size
            if all(chunked.lookup(block_hashes[b]) is not None for b in range(first, hit)):
                return hit * self.block_size
            hit -= 1
        return 0

    def acquire_prefix(self, tables: BlockTables, block_hashes: list[bytes], num_tokens: int) -> None:
        nblocks = num_tokens // self.block_size
        for group in GROUPS:
            pool = self.pools[group]
            first = self._first_needed_block(group, num_tokens)
            table: list[int | None] = [None] * first
            for b in range(first, nblocks):
                block = pool.lookup(block_hashes[b])
                assert block is not None, "prefix checked by longest_cached_prefix"
                pool.acquire_cached(block)
                table.append(block)
            tables.tables[group] = table
            tables.registered[group] = nblocks

    def release_finished_chunks(self, tables: BlockTables, next_query_pos: int) -> None:
        """Drop chunked-group blocks that no query at or after `next_query_pos` can attend to."""
        pool = self.pools[CHUNKED_GROUP]
        table = tables.tables[CHUNKED_GROUP]
        for b in range(min(self.chunk_start(next_query_pos) // self.block_size, len(table))):
            block = table[b]
            if block is not None:
                pool.release(block)
                table[b] = None

    def blocks_needed(self, tables: BlockTables, query_start: int, end: int) -> dict[str, int]:
        need = {}
        last = (end + self.block_size - 1) // self.block_size
        for group in GROUPS:
            table = tables.tables[group]
            first = self._first_needed_block(group, query_start)
            need[group] = sum(1 for b in range(first, last) if b >= len(table) or table[b] is None)
        return need

    def can_allocate(self, tables: BlockTables, query_start: int, end: int) -> bool:
        need = self.blocks_needed(tables, query_start, end)
        return all(need[g] <= self.pools[g].num_free for g in GROUPS)

    def allocate(self, tables: BlockTables, query_start: int, end: int) -> None:
        """Give the request blocks for keys [first needed, end). Call `can_allocate` first."""
        self.release_finished_chunks(tables, query_start)
        last = (end + self.block_size - 1) // self.block_size
        for group in GROUPS:
            pool, table = self.pools[group], tables.tables[group]
            first = self._first_needed_block(group, query_start)
            while len(table) < last:
                table.append(None)
            for b in range(first, last):
                if table[b] is None:
                    table[b] = pool.allocate()

    def register_full_blocks(self, tables: BlockTables, block_hashes: list[bytes], computed: int) -> None:
        """Publish hashes of blocks whose every token's KV is now written."""
        if not self.enable_prefix_caching:
            return
        full = min(computed // self.block_size, len(block_hashes))
        for group in GROUPS:
            pool, table = self.pools[group], tables.tables[group]
            for b in range(tables.registered[group], full):
                block = table[b] if b < len(table) else None
                if block is not None:
                    pool.register(block, block_hashes[b])
            tables.registered[group] = max(tables.registered[group], full)

    def free(self, tables: BlockTables) -> None:
        for group in GROUPS:
            pool = self.pools[group]
            # Release tail first so the LRU evicts a sequence's last blocks before its prefix.
            for block in reversed(tables.tables[group]):
                if block is not None:
                    pool.release(block)
            tables.tables[group] = []
            tables.registered[group] = 0
