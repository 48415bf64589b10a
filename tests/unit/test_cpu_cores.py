"""Engines claim CPU cores of their own (`engine.cpu_cores`): lock files per core, pinning."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from maverick_serve.cli_common import default_engine_cores
from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.engine.native.cpu_cores import claim_cores, pin_engine_thread


def test_claims_on_one_host_never_share_a_core(tmp_path: Path) -> None:
    a = claim_cores([3, 4, 5], 2, tmp_path)
    b = claim_cores([3, 4, 5], 1, tmp_path)
    assert a is not None and b is not None
    assert (a.cores, b.cores) == ([3, 4], [5])
    assert claim_cores([3, 4, 5], 1, tmp_path) is None  # all held
    a.release()
    c = claim_cores([3, 4, 5], 2, tmp_path)
    assert c is not None and c.cores == [3, 4]
    b.release()
    c.release()


def test_too_few_free_cores_hold_none(tmp_path: Path) -> None:
    held = claim_cores([7], 1, tmp_path)
    assert claim_cores([7, 8], 2, tmp_path) is None
    # The failed claim let go of core 8 too.
    other = claim_cores([8], 1, tmp_path)
    assert held is not None and other is not None and other.cores == [8]


def test_a_claim_ends_with_its_process(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from maverick_serve.engine.native.cpu_cores import claim_cores; "
        f"c = claim_cores([9], 1, Path({str(tmp_path)!r})); print(c.cores, flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "[9]"
        assert claim_cores([9], 1, tmp_path) is None
    finally:
        child.kill()
        child.wait()
    after = claim_cores([9], 1, tmp_path)
    assert after is not None and after.cores == [9]


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """Run fn in a fresh thread (masks are per thread) and return what it returned."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def test_pinned_thread_and_the_threads_it_starts_run_on_the_claimed_core(tmp_path: Path) -> None:
    core = max(os.sched_getaffinity(0))

    def pin_then_spawn() -> tuple[list[int] | None, set[int], set[int]]:
        claim = pin_engine_thread([core], 1, tmp_path)
        child_mask = _in_thread(lambda: os.sched_getaffinity(0))
        return (claim.cores if claim else None), os.sched_getaffinity(0), child_mask

    claimed, mask, child_mask = _in_thread(pin_then_spawn)
    assert claimed == [core]
    assert mask == {core} and child_mask == {core}


def test_an_engine_that_finds_its_cores_taken_floats_over_them(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    held = claim_cores([cores[-1]], 1, tmp_path)
    assert held is not None

    def narrowed_then_pin() -> tuple[object, set[int]]:
        os.sched_setaffinity(0, {cores[0]})  # as under `up`: inherited the rest of the stack's core
        claim = pin_engine_thread([cores[-1]], 1, tmp_path)
        return claim, os.sched_getaffinity(0)

    claim, mask = _in_thread(narrowed_then_pin)
    assert claim is None
    assert mask == {cores[0], cores[-1]}
    held.release()


def test_config_refuses_repeated_cores_and_more_threads_than_cores() -> None:
    with pytest.raises(ValidationError, match=r"engine\.cpu_cores lists a core twice"):
        NativeEngineConfig(cpu_cores=[1, 1])
    with pytest.raises(ValidationError, match=r"engine.num_threads=3 exceeds the 2 core\(s\)"):
        NativeEngineConfig(cpu_cores=[1, 2], num_threads=3)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        NativeEngineConfig(cpu_cores=[-1])
    with pytest.raises(ValidationError, match="at least 1 item"):
        NativeEngineConfig(cpu_cores=[])
    assert NativeEngineConfig(cpu_cores=[2, 3], num_threads=2).cpu_cores == [2, 3]


def test_up_gives_engines_every_core_but_the_first() -> None:
    cores = sorted(os.sched_getaffinity(0))
    assert default_engine_cores() == (cores[1:] or None)
