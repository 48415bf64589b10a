"""The Llama 4 tier rule both engines' connectors follow: global (full-attention) layers are
stored for every tier block, chunked layers only for the chunk that holds a prompt's end, so a
stored prefix is usable up to where both are there."""

from __future__ import annotations

from collections.abc import Callable


def longest_tier_hit(
    have_global: list[bool], have_chunked: list[bool], tier_block: int, chunk_first: Callable[[int], int]
) -> int:
    """Tokens of the longest prefix the tier can supply: a run of global blocks, and the chunked
    blocks [chunk_first(end), end) of the chunk that holds its end (tier block indices)."""
    run = 0
    while run < len(have_global) and have_global[run]:
        run += 1
    for n in range(run, 0, -1):
        if all(have_chunked[chunk_first(n * tier_block) : n]):
            return n * tier_block
    return 0
