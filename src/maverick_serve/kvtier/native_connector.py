"""The native engine's KV-tier connector: find and load stored prefixes on admission, store finished blocks.

Llama 4-aware layout. A tier block (default 256 tokens) is stored per layer group:
- `global` (NoPE layers): for every block of the prompt, written behind as prefill proceeds;
- `chunked` (RoPE layers): only the blocks of the attention chunk holding the prompt's end, written
  when the prefill completes. RoPE layers attend within their chunk, so a prefix that ends on a
  chunk boundary needs no chunked KV at all, and one that ends inside the last chunk finds it.
For a prompt much longer than the chunk this stores ~(global layers / all layers) of the bytes an
all-layers layout would: 12/48 for Scout and Maverick.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.block_hashes import chain_block_hashes
from maverick_serve.engine.native.hooks import KVTierFactory, KVTierHooks
from maverick_serve.engine.native.kv_cache import KVCacheManager, flat_slots
from maverick_serve.engine.native.sequence import Sequence
from maverick_serve.kvtier.client import KVTierClient, PendingStore
from maverick_serve.kvtier.codec import CorruptBlockError, decode_block, encode_block_parts
from maverick_serve.kvtier.keys import block_key, model_fingerprint
from maverick_serve.kvtier.layout import longest_tier_hit
from maverick_serve.kvtier.store import KVStoreError, StoreValue
from maverick_serve.kvtier.store_factory import make_store
from maverick_serve.model.attention import CHUNKED_GROUP, GLOBAL_GROUP, PagedKVCache

logger = logging.getLogger(__name__)


def kv_tier_factory(cfg: KVTierConfig | None, model_dir: Path) -> KVTierFactory | None:
    """What `NativeEngine` takes to build its connector, or None when the tier is off."""
    if cfg is None or not cfg.enabled:
        return None
    enabled = cfg
    return lambda spec, dtype, kv, cache: KVTierConnector.create(enabled, model_dir, spec, dtype, kv, cache)


class KVTierConnector(KVTierHooks):
    def __init__(
        self,
        client: KVTierClient,
        spec: ModelSpec,
        fingerprint: str,
        cfg: KVTierConfig,
        kv: KVCacheManager,
        cache: PagedKVCache,
    ) -> None:
        if cfg.block_size % kv.block_size:
            raise ValueError(
                f"kvtier.block_size ({cfg.block_size}) must be a multiple of engine.block_size "
                f"({kv.block_size})"
            )
        self.client = client
        self.spec = spec
        self.fingerprint = fingerprint
        self.block_size = cfg.block_size
        self.prefix = cfg.key_prefix
        self.kv = kv
        self.cache = cache
        self.shared = cfg.store.type == "redis"  # every replica reads the same store
        self.tier_events: deque[bytes] | None = None  # global blocks queued for storing, for routers
        self.layers = {
            GLOBAL_GROUP: list(spec.text.global_layers),
            CHUNKED_GROUP: list(spec.text.chunked_layers),
        }

    @classmethod
    def create(
        cls,
        cfg: KVTierConfig,
        model_dir: Path,
        spec: ModelSpec,
        dtype: str,
        kv: KVCacheManager,
        cache: PagedKVCache,
    ) -> KVTierConnector:
        ttl = cfg.store.ttl_s if cfg.store.type == "redis" else None
        client = KVTierClient(make_store(cfg), ttl, cfg.write_queue_blocks, cfg.breaker)
        if cfg.required:
            try:
                client.ping()
            except (KVStoreError, TimeoutError) as exc:
                client.close()
                raise RuntimeError(f"kvtier.required is true but the KV store is unreachable: {exc}") from exc
        return cls(client, spec, model_fingerprint(model_dir, spec, dtype), cfg, kv, cache)

    # ---- keys ------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence) -> list[bytes]:
        if seq.tier_hashes is None:
            prompt = seq.request.prompt_token_ids
            seq.tier_hashes = chain_block_hashes(prompt, self.block_size, [], seq.image_spans)
        return seq.tier_hashes

    def _key(self, group: str, block_hash: bytes) -> str:
        return block_key(self.prefix, self.fingerprint, group, block_hash)

    def _chunk_first_block(self, tokens: int) -> int:
        return self.kv.chunk_start(tokens) // self.block_size

    # ---- admission -------------------------------------------------------------------------
    def extend_prefix(self, seq: Sequence, local_hit: int) -> int:
        """Called on admission. Returns tokens whose KV is now in the engine's cache from the tier
        (blocks allocated and filled), or 0 to keep the local prefix-cache hit."""
        hashes = self._hashes(seq)
        usable = min(len(hashes), (seq.prompt_len - 1) // self.block_size)
        if usable * self.block_size <= local_hit:
            return 0
        keys_g = [self._key(GLOBAL_GROUP, h) for h in hashes[:usable]]
        keys_c = [self._key(CHUNKED_GROUP, h) for h in hashes[:usable]]
        present = self.client.exists_many(keys_g + keys_c)  # one round trip for every candidate
        have_g, have_c = present[:usable], present[usable:]
        best = longest_tier_hit(have_g, have_c, self.block_size, self._chunk_first_block)
        if best <= local_hit:
            self.client.stats.miss_tokens += seq.prompt_len
            return 0
        if not self.kv.can_allocate(seq.blocks, best, best):
            return 0
        if not self._load(seq, hashes, best):
            return 0
        self.client.stats.hit_tokens += best
        self.client.stats.miss_tokens += seq.prompt_len - best
        return best

    def _load(self, seq: Sequence, hashes: list[bytes], tokens: int) -> bool:
        n = tokens // self.block_size
        first_c = self._chunk_first_block(tokens)
        keys = [self._key(GLOBAL_GROUP, h) for h in hashes[:n]] + [
            self._key(CHUNKED_GROUP, h) for h in hashes[first_c:n]
        ]
        values = self.client.get_many(keys)  # one round trip
        blocks: list[tuple[str, int, torch.Tensor]] = []
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            group = GLOBAL_GROUP if i < n else CHUNKED_GROUP
            index = i if i < n else first_c + (i - n)
            if value is None:
                return False  # evicted between lookup and load: a miss
            try:
                tensor, header = decode_block(value)
            except CorruptBlockError as exc:
                logger.warning("KV block %s refused (%s); deleting it and recomputing", key, exc)
                self.client.stats.checksum_failures += 1
                self.client.delete_many([key])
                return False
            expected = (
                len(self.layers[group]),
                2,
                self.block_size,
                self.spec.text.num_key_value_heads,
                self.spec.text.head_dim,
            )
            if header.group != group or header.shape != expected or header.start != index * self.block_size:
                self.client.stats.checksum_failures += 1
                self.client.delete_many([key])
                return False
            blocks.append((group, index, tensor))
        self.kv.allocate(seq.blocks, tokens, tokens)
        for group, index, tensor in blocks:
            slots = self._slots(seq, group, index)
            for li, layer in enumerate(self.layers[group]):
                self.cache.k[layer][slots] = tensor[li, 0].to(
                    self.cache.k[layer].device, self.cache.k[layer].dtype
                )
                self.cache.v[layer][slots] = tensor[li, 1].to(
                    self.cache.v[layer].device, self.cache.v[layer].dtype
                )
        return True

    def _slots(self, seq: Sequence, group: str, index: int) -> torch.Tensor:
        start = index * self.block_size
        table = seq.blocks.tables[group]
        return flat_slots(table, self.kv.block_size, start, start + self.block_size).to(
            self.cache.k[0].device
        )

    # ---- storing ---------------------------------------------------------------------------
    def _gather(self, seq: Sequence, group: str, index: int) -> torch.Tensor:
        slots = self._slots(seq, group, index)
        return torch.stack(
            [
                torch.stack([self.cache.k[layer][slots], self.cache.v[layer][slots]])
                for layer in self.layers[group]
            ]
        ).cpu()

    def after_step(self, seq: Sequence, before: int) -> None:
        """Store tier blocks the last step completed (global), and at the end of the prompt the
        chunked-layer blocks of its final chunk. Copies happen here; encoding and I/O do not."""
        prompt = seq.prompt_len
        hashes = self._hashes(seq)
        done_before = min(before, prompt) // self.block_size
        done_now = min(seq.num_computed, prompt) // self.block_size
        items: list[PendingStore] = []
        for index in range(max(done_before, seq.tier_stored), min(done_now, len(hashes))):
            kv = self._gather(seq, GLOBAL_GROUP, index)
            items.append((self._key(GLOBAL_GROUP, hashes[index]), self._encoder(kv, GLOBAL_GROUP, index)))
            if self.tier_events is not None:
                self.tier_events.append(hashes[index])
            seq.tier_stored = index + 1
        if seq.num_computed >= prompt and not seq.tier_chunked_stored:
            seq.tier_chunked_stored = True
            for index in range(self._chunk_first_block(prompt), prompt // self.block_size):
                kv = self._gather(seq, CHUNKED_GROUP, index)
                items.append(
                    (self._key(CHUNKED_GROUP, hashes[index]), self._encoder(kv, CHUNKED_GROUP, index))
                )
        if items:
            self.client.submit(items)

    def _encoder(self, kv: torch.Tensor, group: str, index: int) -> Callable[[], StoreValue]:
        start = index * self.block_size
        return lambda: encode_block_parts(kv, group, start, start + self.block_size)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.client.flush(timeout_s)

    def stats(self) -> dict[str, int | float]:
        return dataclasses.asdict(self.client.stats)

    def close(self) -> None:
        self.client.close()
