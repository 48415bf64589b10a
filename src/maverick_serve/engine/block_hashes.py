"""Prefix block hashes: one chain over every full block of a prompt, shared by everyone who names KV blocks.

The native engine's prefix cache, the routers' block index and both KV-tier connectors key blocks by
these hashes, so a router can tell which replica holds a prompt's prefix whatever the backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def chain_block_hashes(
    token_ids: list[int],
    block_size: int,
    start_hashes: list[bytes],
    extra_keys: list[tuple[int, int, str]],
) -> list[bytes]:
    """Hashes of every full block of `token_ids`, extending `start_hashes`.

    `extra_keys` are (start, end, content_hash) spans, e.g. images: a block overlapping a span
    mixes its hash in, so the same image tokens with different pixels never collide.
    """
    hashes = list(start_hashes)
    for b in range(len(hashes), len(token_ids) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        keys = [key for s, e, key in extra_keys if s < hi and e > lo]
        hashes.append(next_block_hash(hashes[-1] if hashes else None, token_ids[lo:hi], keys))
    return hashes


def next_block_hash(parent: bytes | None, block_tokens: list[int], extra_keys: Sequence[str] = ()) -> bytes:
    """One link of the chain: the hash of a block from its parent's hash (None for a prompt's
    first block), its tokens and the extra keys that overlap it."""
    h = hashlib.blake2b(parent if parent is not None else b"root", digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in block_tokens))
    for key in extra_keys:
        h.update(key.encode())
    return h.digest()
