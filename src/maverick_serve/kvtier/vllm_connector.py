"""`Llama4TierConnector`: vLLM's KV connector (V1) onto our KV tier, with the hybrid KV manager on.

vLLM loads it by name (`vllm_plan.kv_transfer_config`) in two processes: the scheduler side in
the engine core (lookups, and the plan of what to load and store each step) and the worker side
next to the KV cache (the copies and the I/O). Each side opens its own `KVTierClient` on the
shared store (Redis, or Redis with a Mooncake bulk transport); an in-process memory store
cannot serve two processes and is refused by the config.

- `SupportsHMA`: without it vLLM 0.32 turns its hybrid manager off and Llama 4's chunked layers
  keep every token (4x the KV memory). The layout rule is in `vllm_plan`.
- Loads are asynchronous in vLLM's terms (the request waits in WAITING_FOR_REMOTE_KVS for one
  step): a failed load (missing, corrupt, store down) is reported as `failed_recving`, which
  vLLM turns into a recompute of the prompt. That is the only load-failure report vLLM 0.32
  accepts with several KV cache groups (block-level reports are refused there). A request
  aborted while its load is with the worker keeps its blocks until that load reports back.
- Stores are write-behind: the step copies its finished blocks out of the cache, the client's
  writer thread encodes and sends them, and a full queue drops blocks (a later miss).
- Corrupt values (checksum, header) are deleted and the prompt recomputed: a miss, never a
  wrong answer. Nothing is pickled by us: values are `codec` blocks, keys strings; the
  per-step metadata is vLLM's own message between its processes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec

from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.block_hashes import chain_block_hashes
from maverick_serve.kvtier.client import KVTierClient, PendingStore
from maverick_serve.kvtier.codec import CorruptBlockError, decode_block, encode_block_parts
from maverick_serve.kvtier.keys import model_fingerprint
from maverick_serve.kvtier.store import StoreValue
from maverick_serve.kvtier.store_factory import make_store
from maverick_serve.kvtier.vllm_plan import (
    CHUNKED,
    GLOBAL,
    BlockItem,
    KeyMaker,
    RequestPlan,
    TierLayout,
    VllmGroup,
    check_layout,
    load_items,
    longest_hit,
    save_items,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass
class TierMetadata(KVConnectorMetadata):
    """One step's work for the worker side."""

    loads: dict[str, list[BlockItem]] = field(default_factory=dict)  # request id -> its blocks
    saves: list[BlockItem] = field(default_factory=list)


def layout_of(kv_cache_config: KVCacheConfig, tier_block: int) -> TierLayout:
    groups, chunks = [], set()
    for i, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        if isinstance(spec, ChunkedLocalAttentionSpec):
            kind = CHUNKED
            chunks.add(spec.attention_chunk_size)
        elif isinstance(spec, FullAttentionSpec):
            kind = GLOBAL
        else:
            raise ValueError(f"KV cache group {i} is {type(spec).__name__}: not a Llama 4 layout")
        describe = f"{spec.num_kv_heads}x{spec.head_size}:{spec.dtype}:{spec.block_size}"
        groups.append(VllmGroup(i, kind, tuple(group.layer_names), describe))
    block = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    layout = TierLayout(tuple(groups), block, tier_block, max(chunks) if chunks else tier_block)
    check_layout(layout)
    return layout


class Llama4TierConnector(KVConnectorBase_V1, SupportsHMA):
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped store is a later miss

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.cfg = KVTierConfig.model_validate(extra["kvtier"])
        if self.cfg.store.type != "redis":
            raise ValueError("the vLLM tier connector needs a shared store: kvtier.store.type: redis")
        self.layout = layout_of(kv_cache_config, self.cfg.block_size)
        model_dir = Path(vllm_config.model_config.model)
        spec = ModelSpec.from_pretrained_dir(model_dir)
        dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        self.fingerprint = self.layout.fingerprint(model_fingerprint(model_dir, spec, dtype))
        self.client = KVTierClient(
            make_store(self.cfg), self.cfg.store.ttl_s, self.cfg.write_queue_blocks, self.cfg.breaker
        )
        self.is_scheduler = role == KVConnectorRole.SCHEDULER
        # scheduler side
        self.plans: dict[str, RequestPlan] = {}
        self.lookups: dict[str, tuple[int, int]] = {}  # request id -> (local tokens, tier hit)
        self.pending_loads: dict[str, list[BlockItem]] = {}  # planned, not yet sent to the worker
        self.loading: set[str] = set()  # sent to the worker, its finished_recving not back yet
        self.failed: set[str] = set()  # a load failed: recompute, never look it up again
        # worker side
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.block_shape: tuple[int, ...] = ()
        self.finished_loads: set[str] = set()
        self.failed_loads: set[str] = set()
        if self.is_scheduler:
            layout_key = f"{self.cfg.key_prefix}:{self.fingerprint}:layout"
            self.client.submit([(layout_key, json.dumps(self.layout.describe()).encode())])
            logger.info(
                "KV tier connector on: %d full-attention and %d chunked groups, tier block %d tokens",
                len(self.layout.of(GLOBAL)),
                len(self.layout.of(CHUNKED)),
                self.layout.tier_block,
            )

    # ---- scheduler side --------------------------------------------------------------------
    def _plan(self, rid: str, prompt_token_ids: list[int] | None) -> RequestPlan:
        plan = self.plans.get(rid)
        if plan is None:
            prompt = list(prompt_token_ids or [])
            hashes = chain_block_hashes(prompt, self.layout.tier_block, [], [])
            plan = self.plans[rid] = RequestPlan(hashes, len(prompt))
        return plan

    def _keys(self, plan: RequestPlan) -> KeyMaker:
        return KeyMaker(self.cfg.key_prefix, self.fingerprint, tuple(plan.hashes))

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        rid = request.request_id
        if request.mm_features or rid in self.failed:  # images: text keys only; failed: recompute
            return 0, False
        known = self.lookups.get(rid)
        if known is not None and known[0] == num_computed_tokens:  # asked again while blocked
            return known[1] - num_computed_tokens, True
        plan = self._plan(request.request_id, request.prompt_token_ids)
        usable = min(len(plan.hashes), (plan.prompt_len - 1) // self.layout.tier_block)
        if usable * self.layout.tier_block <= num_computed_tokens:
            return 0, False
        keys = self._keys(plan)
        present = self.client.exists_many(
            [keys.key(GLOBAL, i) for i in range(usable)] + [keys.key(CHUNKED, i) for i in range(usable)]
        )
        hit = longest_hit(present[:usable], present[usable:], self.layout)
        if hit <= num_computed_tokens:
            self.client.stats.miss_tokens += plan.prompt_len
            return 0, False
        self.lookups[request.request_id] = (num_computed_tokens, hit)
        return hit - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        lookup = self.lookups.pop(rid, None)
        if num_external_tokens <= 0 or lookup is None:
            return
        computed, hit = lookup
        plan = self._plan(request.request_id, request.prompt_token_ids)
        tables = [list(ids) for ids in blocks.get_block_ids()]
        items = load_items(self.layout, self._keys(plan), tables, computed, hit)
        self.pending_loads[rid] = items  # [] is reported as a failed load: a recompute
        if items:  # (loaded blocks are not stored again: stores start at the computed tokens)
            self.client.stats.hit_tokens += hit - computed
            self.client.stats.miss_tokens += plan.prompt_len - hit

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TierMetadata(loads=self.pending_loads)
        self.loading |= set(self.pending_loads)
        self.pending_loads = {}
        for new in scheduler_output.scheduled_new_reqs:
            if new.mm_features:  # not in the tier on this backend
                continue
            plan = self._plan(new.req_id, new.prompt_token_ids)
            plan.tables = [list(ids) for ids in new.block_ids]
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            meta.saves += self._saves(plan, new.num_computed_tokens, scheduled)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid not in self.plans:  # images, or not seen by the lookup
                continue
            plan = self.plans[rid]
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids and new_ids is not None:  # all its blocks, afresh
                plan.tables = [list(ids) for ids in new_ids]
            elif new_ids is not None:
                for table, ids in zip(plan.tables, new_ids, strict=True):
                    table.extend(ids)
            computed = cached.num_computed_tokens[i]
            if computed >= plan.prompt_len:
                continue  # decoding: nothing of the prompt left to store
            scheduled = scheduler_output.num_scheduled_tokens.get(rid, 0)
            meta.saves += self._saves(plan, computed, scheduled)
        return meta

    def _saves(self, plan: RequestPlan, computed: int, scheduled: int) -> list[BlockItem]:
        items = save_items(self.layout, self._keys(plan), plan, computed, scheduled)
        if items:
            plan.last_saved = [it.key for it in items]
        return items

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.loading -= set(connector_output.finished_recving or ())
        # vLLM recomputes a failed load; a second lookup would find the same keys and fail again
        # (e.g. values listed but not fetchable in time).
        self.failed |= set(connector_output.failed_recving or ())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request.request_id)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request.request_id)

    def _finished(self, rid: str) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request. True (keep its blocks) while the worker may still be writing a
        load into them: vLLM frees them when that load's finished_recving arrives. The params
        (they reach the request's output) name the keys of the prompt's last stored step:
        stores go out in order, so once they are there the prompt's KV is (the P/D hand-off)."""
        plan = self.plans.pop(rid, None)
        self.lookups.pop(rid, None)
        self.pending_loads.pop(rid, None)
        self.failed.discard(rid)
        # Only keys this request stored: a prompt whose blocks were local hits names none.
        params = {"tier_keys": plan.last_saved} if plan is not None and plan.last_saved else None
        return rid in self.loading, params

    # ---- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        shapes = {tuple(t.shape[1:]) for t in kv_caches.values()}
        if len(shapes) != 1:
            raise ValueError(f"KV cache layers have different block shapes {sorted(shapes)}")
        self.block_shape = shapes.pop()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        for rid, items in meta.loads.items():
            self.finished_loads.add(rid)
            if not items or not self._load(items):
                self.failed_loads.add(rid)

    def _load(self, items: list[BlockItem]) -> bool:
        values = self.client.get_many([it.key for it in items])  # one round trip
        tensors = []
        for it, value in zip(items, values, strict=True):
            if value is None:
                return False  # evicted since the lookup, or the store is down: recompute
            try:
                tensor, header = decode_block(value)
                expected = (len(self.layout.layers(it.kind)), self.layout.ratio, *self.block_shape)
                if header.group != it.kind or header.shape != expected:
                    raise CorruptBlockError(f"block shape {header.shape}, expected {expected}")
                if header.start != it.index * self.layout.tier_block:
                    raise CorruptBlockError(f"block starts at token {header.start}")
            except CorruptBlockError as exc:
                logger.warning("KV block %s refused (%s); deleting it and recomputing", it.key, exc)
                self.client.stats.checksum_failures += 1
                self.client.delete_many([it.key])
                return False
            tensors.append(tensor)
        for it, tensor in zip(items, tensors, strict=True):
            for li, (group, name) in enumerate(self.layout.layers(it.kind)):
                cache = self.kv_caches[name]
                for j, block in enumerate(it.block_ids[group]):
                    if block:
                        cache[block].copy_(tensor[li, j])
        return True

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the request is scheduled

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # stores are gathered once per step in wait_for_save

    def wait_for_save(self) -> None:
        """After the step's forward: copy out the blocks it completed; encoding and I/O happen on
        the client's writer thread."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        pending: list[PendingStore] = []
        for it in meta.saves:
            layers = self.layout.layers(it.kind)
            kv = torch.stack(
                [self.kv_caches[name][torch.tensor(it.block_ids[group])] for group, name in layers]
            ).cpu()
            pending.append((it.key, self._encoder(kv, it)))
        if pending:
            self.client.submit(pending)

    def _encoder(self, kv: torch.Tensor, it: BlockItem) -> Callable[[], StoreValue]:
        start = it.index * self.layout.tier_block
        return lambda: encode_block_parts(kv, it.kind, start, start + self.layout.tier_block)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        done, failed = self.finished_loads, self.failed_loads
        self.finished_loads, self.failed_loads = set(), set()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def shutdown(self) -> None:
        self.client.flush(5.0)  # queued stores get their chance; the client bounds the wait
        self.client.close()
