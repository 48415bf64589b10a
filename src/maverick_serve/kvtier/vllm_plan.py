"""What the vLLM connector loads and stores, as plain data (no vLLM import: unit-tested in .venv).

vLLM's hybrid KV manager gives Llama 4 one group of full-attention (NoPE) layers and several
groups of chunked-local (RoPE) layers; every group has its own block table, and the chunked
groups hold the null block (id 0) before the chunk that holds the request's position. The
tier keeps the native engine's rule, over vLLM's tables:
- `global`: the full-attention layers, every tier block of the prompt, stored as prefill goes;
- `chunked`: the chunked layers, only the tier blocks of the chunk holding the prompt's end,
  stored when the prompt is complete.
A tier block spans `ratio` vLLM blocks; each stored value is one tier block of one tier group:
a tensor [layers, ratio, *vLLM's per-layer block shape].
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.kvtier.keys import block_key
from maverick_serve.kvtier.layout import longest_tier_hit

GLOBAL = "global"
CHUNKED = "chunked"
CONNECTOR_NAME = "Llama4TierConnector"
CONNECTOR_MODULE = "maverick_serve.kvtier.vllm_connector"
LAYOUT_TAG = "vllm-paged-1"  # bump when what a vLLM-written block holds changes


def kv_transfer_config(cfg: KVTierConfig) -> dict[str, Any]:
    """vLLM's `kv_transfer_config` that loads our connector with the tier's settings. The store's
    password stays in the environment variable `password_env` names (vLLM's processes inherit it)."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvtier": cfg.model_dump(mode="json")},
    }


@dataclass(frozen=True)
class VllmGroup:
    """One of vLLM's KV cache groups."""

    index: int
    kind: str  # GLOBAL or CHUNKED
    layers: tuple[str, ...]
    describe: str  # what makes its blocks comparable: heads, head size, dtype, block size


@dataclass(frozen=True)
class TierLayout:
    groups: tuple[VllmGroup, ...]
    vllm_block: int
    tier_block: int
    chunk: int  # attention chunk of the chunked layers

    @property
    def ratio(self) -> int:
        return self.tier_block // self.vllm_block

    def of(self, kind: str) -> list[VllmGroup]:
        return [g for g in self.groups if g.kind == kind]

    def layers(self, kind: str) -> list[tuple[int, str]]:
        """(vLLM group, layer name) of every layer in a tier group, in stored order."""
        return [(g.index, name) for g in self.of(kind) for name in g.layers]

    def chunk_first(self, tokens: int) -> int:
        """First tier block of the chunk that holds position `tokens`."""
        return (tokens - tokens % self.chunk) // self.tier_block

    def describe(self) -> dict[str, Any]:
        return {
            "layout": LAYOUT_TAG,
            "tier_block": self.tier_block,
            "vllm_block": self.vllm_block,
            "chunk": self.chunk,
            "groups": [{"kind": g.kind, "layers": list(g.layers), "spec": g.describe} for g in self.groups],
        }

    def fingerprint(self, model_fingerprint: str) -> str:
        """Namespace of vLLM-written blocks: the model, and vLLM's block layout (never the
        native engine's, whose blocks hold another shape)."""
        h = hashlib.sha256(model_fingerprint.encode())
        h.update(json.dumps(self.describe(), sort_keys=True).encode())
        return h.hexdigest()[:32]


def check_layout(layout: TierLayout) -> None:
    """Tier blocks must be whole vLLM blocks and tile the attention chunk."""
    if layout.tier_block % layout.vllm_block:
        raise ValueError(
            f"kvtier.block_size ({layout.tier_block}) must be a multiple of engine.block_size "
            f"({layout.vllm_block})"
        )
    if layout.chunk % layout.tier_block:
        raise ValueError(
            f"kvtier.block_size ({layout.tier_block}) must divide the model's attention chunk "
            f"({layout.chunk}) with the vLLM backend"
        )
    if not layout.of(GLOBAL):
        raise ValueError("the model has no full-attention layers: the Llama 4 tier connector does not apply")


def longest_hit(have_global: list[bool], have_chunked: list[bool], layout: TierLayout) -> int:
    """Tokens of the longest prefix the tier can supply, by the rule the native connector follows."""
    return longest_tier_hit(have_global, have_chunked, layout.tier_block, layout.chunk_first)


@dataclass
class BlockItem:
    """One stored value: a tier block of one tier group, and where it lives in vLLM's cache."""

    key: str
    kind: str
    index: int  # tier block index in the prompt
    block_ids: dict[int, list[int]]  # vLLM group -> `ratio` block ids (0: leave that block alone)


@dataclass
class RequestPlan:
    """Scheduler-side state of one request."""

    hashes: list[bytes]
    prompt_len: int
    tables: list[list[int]] = field(default_factory=list)  # vLLM block ids per group
    global_stored: int = 0  # tier blocks [0, this) are in the tier
    chunked_stored: bool = False
    last_saved: list[str] = field(default_factory=list)  # keys of the last step that stored any


def item(
    layout: TierLayout, keys: KeyMaker, kind: str, index: int, tables: list[list[int]], skip_below: int
) -> BlockItem | None:
    """The item of tier block `index`, or None when vLLM's tables do not hold all its blocks.
    Positions before vLLM block `skip_below` get id 0 (already in the cache: left alone)."""
    r = layout.ratio
    ids: dict[int, list[int]] = {}
    for g in layout.of(kind):
        row = tables[g.index][index * r : (index + 1) * r]
        if len(row) < r:
            return None
        row = [0 if index * r + j < skip_below else b for j, b in enumerate(row)]
        if any(b == 0 for j, b in enumerate(row) if index * r + j >= skip_below):
            return None  # the null block where we need a real one
        ids[g.index] = row
    return BlockItem(keys.key(kind, index), kind, index, ids)


@dataclass(frozen=True)
class KeyMaker:
    prefix: str
    fingerprint: str
    hashes: tuple[bytes, ...]

    def key(self, kind: str, index: int) -> str:
        return block_key(self.prefix, self.fingerprint, kind, self.hashes[index])


def load_items(
    layout: TierLayout, keys: KeyMaker, tables: list[list[int]], computed: int, hit: int
) -> list[BlockItem]:
    """Items that bring the cache from `computed` local tokens to `hit` tokens; [] when vLLM's
    tables cannot take them (the caller then reports the load as failed: a recompute)."""
    out: list[BlockItem] = []
    skip = computed // layout.vllm_block
    n = hit // layout.tier_block
    for kind, first in ((GLOBAL, computed // layout.tier_block), (CHUNKED, layout.chunk_first(hit))):
        for index in range(first, n):
            made = item(layout, keys, kind, index, tables, skip)
            if made is None:
                return []
            out.append(made)
    return out


def save_items(
    layout: TierLayout, keys: KeyMaker, plan: RequestPlan, computed: int, scheduled: int
) -> list[BlockItem]:
    """Items whose KV this step computes: global tier blocks it completes, and once the prompt is
    complete the chunked tier blocks of its last chunk. Marks them stored in `plan`."""
    prompt = plan.prompt_len
    done_now = min(computed + scheduled, prompt) // layout.tier_block
    out: list[BlockItem] = []
    # Blocks computed before this step (a local prefix hit) were stored when first computed.
    first = max(plan.global_stored, computed // layout.tier_block)
    for index in range(first, min(done_now, len(plan.hashes))):
        made = item(layout, keys, GLOBAL, index, plan.tables, 0)
        if made is None:
            break
        out.append(made)
        plan.global_stored = index + 1
    if computed + scheduled >= prompt and not plan.chunked_stored:
        plan.chunked_stored = True
        for index in range(layout.chunk_first(prompt), prompt // layout.tier_block):
            made = item(layout, keys, CHUNKED, index, plan.tables, 0)
            if made is not None:
                out.append(made)
    return out
