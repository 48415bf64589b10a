"""The environment an engine process starts with so glibc's malloc keeps freed memory.

A step allocates its activations afresh (a 512-token prefill chunk of the tiny model: tensors of
0.5–4 MiB). glibc serves blocks above its mmap threshold (128 KiB until it adapts) with a new
`mmap` and trims the heap top back to the kernel on free, so every step faults its pages in again:
on CPU that is a quarter of the prefill time. Raising both thresholds keeps the pages resident
across steps. The tunables are read when a process starts, so they go into the environment of
the engine process we spawn; they do nothing for a process already running, and nothing on a
libc other than glibc.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 4 * 1024 * 1024 * 1024
KEEP_FREED = {
    "glibc.malloc.mmap_threshold": str(MMAP_THRESHOLD),
    "glibc.malloc.trim_threshold": str(TRIM_THRESHOLD),
}


def malloc_environment(base: Mapping[str, str]) -> dict[str, str]:
    """`GLIBC_TUNABLES` for a child of a process with environment `base`: ours for the two
    malloc thresholds, merged with any tunables `base` already sets (those win)."""
    present = [item for item in base.get("GLIBC_TUNABLES", "").split(":") if item]
    keys = {item.split("=", 1)[0] for item in present}
    ours = [f"{k}={v}" for k, v in KEEP_FREED.items() if k not in keys]
    return {"GLIBC_TUNABLES": ":".join(present + ours)}


def engine_process_environment(keep_freed_memory: bool) -> dict[str, str]:
    """The whole environment of an engine process spawned from this one (`engine_process`, the
    benches' native child): this process's, plus the malloc tunables when asked for."""
    env = dict(os.environ)
    if keep_freed_memory:
        env.update(malloc_environment(os.environ))
    return env
