"""KV block codec, memory store, keys and fingerprints (no Redis, no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from maverick_serve.config import preset
from maverick_serve.kvtier.codec import CorruptBlockError, decode_block, encode_block
from maverick_serve.kvtier.keys import LAYOUT_VERSION, block_key, model_fingerprint
from maverick_serve.kvtier.store import MemoryKVStore
from maverick_serve.model.make_model import make_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(dtype: torch.dtype) -> None:
    t = torch.randn(2, 2, 32, 2, 64).to(dtype)
    out, header = decode_block(encode_block(t, "global", 64, 96))
    assert out.dtype == dtype and torch.equal(out, t)
    assert (header.group, header.shape, header.start, header.end) == ("global", (2, 2, 32, 2, 64), 64, 96)


def test_every_corruption_is_refused() -> None:
    data = encode_block(torch.randn(1, 2, 4, 2, 8), "chunked", 0, 4)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(CorruptBlockError, match="checksum"):
        decode_block(bytes(flipped))
    with pytest.raises(CorruptBlockError, match="truncated"):
        decode_block(data[:-3])
    with pytest.raises(CorruptBlockError, match="bad magic"):
        decode_block(b"XXXX" + data[4:])
    with pytest.raises(CorruptBlockError, match="shorter than a block header"):
        decode_block(b"MV")
    with pytest.raises(CorruptBlockError, match="version"):
        decode_block(data[:4] + (99).to_bytes(2, "little") + data[6:])


def test_no_pickle_in_the_layout() -> None:
    data = encode_block(torch.zeros(1, 2, 1, 1, 2), "global", 0, 1)
    assert data.startswith(b"MVKV") and b"torch" not in data and b"\x80\x04" not in data[:8]


def test_memory_store_is_bounded_lru() -> None:
    store = MemoryKVStore(capacity_bytes=100)

    async def scenario() -> tuple[list[bool], int]:
        await store.put_many([("a", b"x" * 40), ("b", b"y" * 40)], None)
        await store.get_many(["a"])  # a is now most recent
        await store.put_many([("c", b"z" * 40)], None)  # evicts b
        return await store.exists_many(["a", "b", "c"]), store.used

    present, used = asyncio.run(scenario())
    assert present == [True, False, True] and used == 80


def test_keys_and_fingerprints(tiny_model: Path, tmp_path: Path) -> None:
    spec = preset("tiny")
    fp = model_fingerprint(tiny_model, spec, "float32")
    assert fp == model_fingerprint(tiny_model, spec, "float32")
    assert fp != model_fingerprint(tiny_model, spec, "bfloat16")
    make_model(spec, tmp_path / "other", seed=77)
    assert fp != model_fingerprint(tmp_path / "other", spec, "float32")
    key = block_key("mvkv", fp, "global", bytes(16))
    assert key == f"mvkv:{fp}:v{LAYOUT_VERSION}:global:{'00' * 16}"
