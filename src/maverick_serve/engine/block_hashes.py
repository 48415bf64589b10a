"""Prefix block hashes: one chain over every full block of a prompt, shared by everyone who names KV blocks.

The native engine's prefix cache, the routers' block index and both KV-tier connectors key blocks by
these hashes, so a router can tell which replica holds a prompt's prefix whatever the backend.
"""

from __future__ import annotations

import hashlib


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
        h = hashlib.blake2b(hashes[-1] if hashes else b"root", digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little") for t in token_ids[lo:hi]))
        for s, e, key in extra_keys:
            if s < hi and e > lo:
                h.update(key.encode())
        hashes.append(h.digest())
    return hashes
