"""The block checksum and the receive-buffer recycling of the bulk Redis client."""

from __future__ import annotations

import random

import numpy as np

from maverick_serve.kvtier.checksum import ROW_WORDS, checksum64
from maverick_serve.kvtier.resp import RecycledBuffers


def test_checksum_is_fixed_across_machines() -> None:
    # A stored block written by one node is checked by another: the value must never drift
    # (a change here needs a codec VERSION bump).
    assert checksum64(bytes(range(256)) * 40 + b"tail") == 0x176A4F06144ACC54
    assert checksum64(memoryview(bytearray(bytes(range(256)) * 40 + b"tail"))) == 0x176A4F06144ACC54
    assert checksum64(b"") != checksum64(b"\x00") != checksum64(b"\x00" * 8)


def test_every_single_bit_flip_and_word_swap_is_detected() -> None:
    rng = random.Random(0)
    data = bytearray(rng.randbytes(3 * ROW_WORDS * 8 + 13))  # 3 full rows, a partial row, a tail
    digest = checksum64(data)
    for _ in range(3000):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        assert checksum64(flipped) != digest
    words = np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64).copy()
    for i, j in [(0, 1), (5, ROW_WORDS + 5), (7, 2 * ROW_WORDS + 7), (3, len(words) - 1)]:
        swapped = words.copy()
        swapped[[i, j]] = swapped[[j, i]]
        assert checksum64(swapped.tobytes() + bytes(data[len(words) * 8 :])) != digest
    assert checksum64(data[:-1]) != digest  # truncation


def test_recycled_buffers_never_reuse_a_buffer_someone_holds() -> None:
    pool = RecycledBuffers(capacity_bytes=1 << 20)
    held = pool.take(100_000)
    held[:3] = b"abc"
    view = np.frombuffer(held, dtype=np.uint8)  # a live view also keeps it out of reuse
    del held
    other = pool.take(100_000)
    assert bytes(view[:3]) == b"abc" and other is not view.base
    del view
    first_id = id(other)
    del other
    reused = pool.take(100_000)  # both pooled buffers are free again: one comes back
    assert id(reused) in {id(b) for b in pool.by_size[100_000]} and pool.held == 200_000
    assert first_id in {id(b) for b in pool.by_size[100_000]}
    small = pool.take(10)
    assert len(small) == 10 and 10 not in pool.by_size  # small values are not pooled


def test_recycled_buffers_stay_within_capacity() -> None:
    pool = RecycledBuffers(capacity_bytes=250_000)
    kept = [pool.take(100_000) for _ in range(5)]
    assert pool.held == 200_000 and all(len(b) == 100_000 for b in kept)
