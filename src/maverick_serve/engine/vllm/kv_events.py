"""vLLM's prefix-cache events as the replica reports them to routers: a `CacheView` fed by a ZMQ
subscriber to the engine core's KV-event publisher (`kv_events_config`).

vLLM names blocks by its own hashes; routers match prompts against ours
(`engine.block_hashes.chain_block_hashes`, one `next_block_hash` per block). Each `BlockStored`
carries the blocks' token ids and the hash of the block before them, so our hash of each block
is the next link over its tokens from our hash of that parent (kept for every block still
cached); `BlockRemoved` drops blocks by vLLM's hash through the same map. Only the full-
attention group is reported: its blocks are the ones a router can match a whole prefix against
(the chunked-attention group keeps only recent chunks). Blocks hashed with extra keys (images,
LoRA, cache salt) are not reported, nor blocks after them: their key mixes in what our hash
cannot see. Events lost to the publisher's high-water mark only make the router's view drift
until blocks are stored again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import msgspec
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from maverick_serve.engine.block_hashes import next_block_hash
from maverick_serve.engine.cache_view import CacheView

logger = logging.getLogger(__name__)
FULL_ATTENTION = "full_attention"
POLL_MS = 200


def kv_events_config(endpoint: str) -> dict[str, Any]:
    """The engine args' `kv_events_config`: vLLM's ZMQ publisher bound to `endpoint`."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": "kv"}


class BlockKeyMap:
    """vLLM block hash → our block hash, for the blocks vLLM holds in the full-attention group."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.ours: dict[Any, bytes] = {}
        self.group: int | None = None  # the full-attention group's index, once seen

    def apply(self, event: object) -> list[tuple[bool, bytes]]:
        """Our (stored, hash) events for one vLLM event."""
        if isinstance(event, BlockStored):
            return self._stored(event)
        if isinstance(event, BlockRemoved):
            if event.group_idx is not None and self.group is not None and event.group_idx != self.group:
                return []
            return [(False, h) for h in (self.ours.pop(v, None) for v in event.block_hashes) if h is not None]
        if isinstance(event, AllBlocksCleared):
            cleared = [(False, h) for h in self.ours.values()]
            self.ours.clear()
            return cleared
        return []

    def _stored(self, event: BlockStored) -> list[tuple[bool, bytes]]:
        kind = event.kv_cache_spec_kind
        if kind is not None and kind != FULL_ATTENTION:
            return []
        if event.group_idx is not None:
            self.group = event.group_idx
        if event.block_size != self.block_size or event.lora_name is not None or event.lora_id is not None:
            return []
        parent: bytes | None = None
        if event.parent_block_hash is not None:
            parent = self.ours.get(event.parent_block_hash)
            if parent is None:  # its parent is not ours to name: neither is it
                return []
        out = []
        for i, vllm_hash in enumerate(event.block_hashes):
            if event.extra_keys and event.extra_keys[i]:
                break
            tokens = event.token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = self.ours[vllm_hash] = next_block_hash(parent, tokens)
            out.append((True, parent))
        return out


class VllmCacheView(CacheView):
    """Subscribes to the engine core's publisher on `endpoint` and mirrors its full-attention
    blocks; no KV tier behind it (the vLLM connector's stores are not reported yet)."""

    has_tier = False
    tier_shared = True

    def __init__(self, endpoint: str, block_size: int) -> None:
        self.keys = BlockKeyMap(block_size)
        self._lock = threading.Lock()
        self._events: deque[tuple[bool, bytes]] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        self._sub.connect(endpoint)
        self._thread.start()

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            try:
                if not self._sub.poll(POLL_MS):
                    continue
                _topic, _seq, payload = self._sub.recv_multipart()
                batch = decoder.decode(payload)
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                logger.exception("vLLM KV events: receive failed")
                continue
            except msgspec.DecodeError:
                logger.exception("vLLM KV events: a batch could not be decoded; skipped")
                continue
            with self._lock:
                ours = [e for event in batch.events for e in self.keys.apply(event)]
                if self._events is not None:
                    self._events.extend(ours)

    def cache_events(self, maxlen: int) -> deque[tuple[bool, bytes]]:
        with self._lock:
            if self._events is None:
                self._events = deque(maxlen=maxlen)
            return self._events

    def tier_events(self, maxlen: int) -> deque[bytes] | None:
        return None

    def cached_blocks(self) -> list[bytes]:
        with self._lock:
            return list(self.keys.ours.values())

    def flush_tier(self, timeout_s: float) -> None:
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sub.close(linger=0)
        self._ctx.term()
