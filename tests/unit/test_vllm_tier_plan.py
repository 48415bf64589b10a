"""What the vLLM tier connector loads and stores, over vLLM-shaped block tables (no vLLM needed):
the Llama 4 rule (global blocks always, chunked blocks of the last chunk), block ids per group,
the null block, and the refused layouts."""

from __future__ import annotations

import json

import pytest

from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.kvtier.vllm_plan import (
    CHUNKED,
    GLOBAL,
    KeyMaker,
    RequestPlan,
    TierLayout,
    VllmGroup,
    check_layout,
    kv_transfer_config,
    load_items,
    longest_hit,
    save_items,
)

# The tiny model under vLLM: 3 chunked groups and 1 full group of 2 layers, blocks of 32 tokens.
GROUPS = tuple(
    [VllmGroup(i, CHUNKED, (f"l{i}", f"l{i + 4}"), "2x64") for i in range(3)]
    + [VllmGroup(3, GLOBAL, ("l3", "l7"), "2x64")]
)


def _layout(tier_block: int = 32, chunk: int = 64) -> TierLayout:
    return TierLayout(GROUPS, vllm_block=32, tier_block=tier_block, chunk=chunk)


def _keys(n: int) -> KeyMaker:
    return KeyMaker("p", "f", tuple(bytes([i]) * 16 for i in range(n)))


def _tables(n_blocks: int, chunked_from: int = 0) -> list[list[int]]:
    """Block ids per group as vLLM hands them: group g's block j is 100*g + j + 1, and chunked
    groups hold the null block (0) before `chunked_from`."""
    return [
        [0 if (g < 3 and j < chunked_from) else 100 * g + j + 1 for j in range(n_blocks)] for g in range(4)
    ]


def test_longest_hit_needs_the_chunked_blocks_of_the_chunk_holding_its_end() -> None:
    layout = _layout()
    # 5 of 6 global blocks; chunked only block 4 (a prompt that ended inside chunk [128, 192)).
    have_g = [True] * 5 + [False]
    have_c = [False, False, False, False, True, False]
    assert longest_hit(have_g, have_c, layout) == 160  # 5 blocks: chunk [128,..) needs block 4: there
    assert longest_hit([True] * 6, have_c, layout) == 192  # a whole 3rd chunk: a boundary
    assert longest_hit(have_g, [False] * 6, layout) == 128  # a chunk boundary needs no chunked block
    assert longest_hit([True, False, True, True], [True] * 4, layout) == 32  # global run stops at the gap
    assert longest_hit([False] * 4, [True] * 4, layout) == 0


def test_loads_skip_local_blocks_and_fill_each_groups_own_blocks() -> None:
    layout = _layout(tier_block=64)  # ratio 2: a tier block spans two vLLM blocks
    tables = _tables(6, chunked_from=4)  # positions 0..191; chunk of 160 starts at block 4
    items = load_items(layout, _keys(3), tables, computed=32, hit=192)
    globals_ = [i for i in items if i.kind == GLOBAL]
    chunked = [i for i in items if i.kind == CHUNKED]
    assert [i.index for i in globals_] == [0, 1, 2]
    assert globals_[0].block_ids == {3: [0, 302]}  # vLLM block 0 is a local hit: left alone
    assert globals_[2].block_ids == {3: [305, 306]}
    # hit 192 is a chunk boundary (chunk 64): no chunked block needed.
    assert chunked == []
    items = load_items(layout, _keys(3), _tables(6, chunked_from=2), computed=0, hit=160 // 64 * 64 + 64)
    assert [i.index for i in items if i.kind == CHUNKED] == []
    # A hit inside a chunk loads that chunk's chunked blocks, per chunked group.
    layout32 = _layout(tier_block=32)
    items = load_items(layout32, _keys(6), _tables(6, chunked_from=4), computed=0, hit=160)
    chunked = [i for i in items if i.kind == CHUNKED]
    assert [i.index for i in chunked] == [4]
    assert chunked[0].block_ids == {0: [5], 1: [105], 2: [205]}
    # Where vLLM holds the null block but the load needs a real one, nothing is loaded.
    assert load_items(layout32, _keys(6), _tables(6, chunked_from=5), computed=0, hit=160) == []
    assert load_items(layout32, _keys(6), _tables(3), computed=0, hit=160) == []  # table too short


def test_saves_follow_the_prefill_and_store_the_last_chunk_once() -> None:
    layout = _layout()
    plan = RequestPlan([bytes([i]) * 16 for i in range(9)], prompt_len=300, tables=_tables(10))
    keys = _keys(9)
    first = save_items(layout, keys, plan, computed=0, scheduled=100)
    assert [(i.kind, i.index) for i in first] == [(GLOBAL, 0), (GLOBAL, 1), (GLOBAL, 2)]
    second = save_items(layout, keys, plan, computed=100, scheduled=200)
    assert [(i.kind, i.index) for i in second] == [(GLOBAL, b) for b in range(3, 9)] + [(CHUNKED, 8)]
    assert second[-1].block_ids == {0: [9], 1: [109], 2: [209]}
    assert save_items(layout, keys, plan, computed=300, scheduled=1) == []  # decoding stores nothing
    # A local prefix hit of 128 tokens: its blocks were stored when first computed.
    hit = RequestPlan([bytes([i]) * 16 for i in range(9)], prompt_len=300, tables=_tables(10))
    assert [i.index for i in save_items(layout, keys, hit, computed=128, scheduled=172)][:2] == [4, 5]


def test_layouts_the_connector_refuses() -> None:
    check_layout(_layout())
    with pytest.raises(ValueError, match=r"kvtier.block_size \(48\) must be a multiple of engine.block_size"):
        check_layout(_layout(tier_block=48))
    with pytest.raises(ValueError, match=r"must divide the model's attention chunk \(64\)"):
        check_layout(_layout(tier_block=128))
    with pytest.raises(ValueError, match="no full-attention layers"):
        check_layout(TierLayout(GROUPS[:3], 32, 32, 64))


def test_namespace_follows_model_and_layout_and_the_config_carries_no_secret() -> None:
    a, b = _layout(32), _layout(64)
    assert a.fingerprint("m") != b.fingerprint("m") != b.fingerprint("n")
    assert a.fingerprint("m") == _layout(32).fingerprint("m")
    cfg = KVTierConfig.model_validate(
        {"store": {"type": "redis", "url": "redis://r:6379/0", "password_env": "REDIS_PASSWORD"}}
    )
    transfer = kv_transfer_config(cfg)
    assert transfer["kv_connector"] == "Llama4TierConnector"
    assert transfer["kv_load_failure_policy"] == "recompute"
    assert "REDIS_PASSWORD" in json.dumps(transfer)  # the variable's name, never its value
    assert KVTierConfig.model_validate(transfer["kv_connector_extra_config"]["kvtier"]) == cfg
