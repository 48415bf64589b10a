"""Faults of `engine.separate_process`, where each engine replica steps its engine in a child
process, under the chaos tier's steady load (`chaos_load`), counted.

- the engine process killed (SIGKILL), its replica alive: the replica's streams end with an
  error event, new requests sent there fail before their first token and go elsewhere, Serve's
  health check replaces the replica;
- the engine replica killed: its engine process sees EOF on its socket and exits, no orphan.
After each fault every engine process belongs to a live replica, one each.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
from chaos_load import Load, assert_bounds, replica_actors, run_fault, wait_replicas
from ray._private.state import actors as actor_table

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.serving.engine_process.client import CORE_MODULE
from serve_helpers import serve_app

APP = "chaosproc"
DEPLOYMENT = "LlamaEngine"
CLIENTS = 6
PROMPTS = [f"Engine process client {i}: say something about caches." for i in range(CLIENTS)]
LOAD_S = 30.0
TABLE: dict[str, Counter[str]] = {}


def engine_processes() -> dict[int, int]:
    """pid → parent pid of every live engine process on this host."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if CORE_MODULE.encode() not in (entry / "cmdline").read_bytes():
                continue
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile
            continue
        if state != "Z":
            found[int(entry.name)] = int(ppid)
    return found


def replica_pids() -> dict[str, int]:
    """Engine replica actor name → its worker's pid (from the GCS actor table: the state API
    needs the dashboard, which this cluster runs without)."""
    names = set(replica_actors(APP, DEPLOYMENT))
    alive = actor_table(actor_state_name="ALIVE").values()
    return {a["Name"]: int(a["Pid"]) for a in alive if a["Name"] in names}


def wait_one_engine_process_per_replica(timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        replicas, children = replica_pids(), engine_processes()
        if sorted(children.values()) == sorted(replicas.values()) and len(children) == 2:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine processes (pid → parent) {children} vs replicas {replicas}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def load(tiny_model: Path) -> Iterator[Load]:
    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": APP},
            "engine": {
                "kv_cache_memory_gib": 0.1,
                "num_threads": 1,
                "max_model_len": 2048,
                "separate_process": True,
            },
            "kvtier": {"enabled": False},
            "resources": {"engine": {"replicas": 2, "num_cpus": 1}, "router": {"replicas": 1}},
        }
    )
    with serve_app(cfg, APP) as url:
        load = Load(url, APP)
        asyncio.run(load.record_reference(PROMPTS))
        wait_one_engine_process_per_replica()
        yield load
    deadline = time.monotonic() + 30
    while engine_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not engine_processes(), "engine processes outlived their replicas"


def _busiest(load: Load) -> str:
    victims = replica_actors(APP, DEPLOYMENT)
    assert victims, "no engine replica"
    victims.sort(key=lambda name: -load.served_by[name.rsplit("#", 1)[1]])
    return victims[0]


def _kill_engine_process(load: Load, killed: list[str]) -> None:
    victim = _busiest(load)
    pid = replica_pids()[victim]
    child = next(c for c, parent in engine_processes().items() if parent == pid)
    os.kill(child, signal.SIGKILL)
    killed.append(victim)


def _kill_replica(load: Load, killed: list[str]) -> None:
    victim = _busiest(load)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed.append(victim)


def _replaced(killed: list[str]) -> None:
    """Serve replaced the replica the fault hit (for a dead engine process: its health check)."""
    deadline = time.monotonic() + 120
    while killed and killed[0] in replica_actors(APP, DEPLOYMENT):
        assert time.monotonic() < deadline, f"{killed[0]} was not replaced"
        time.sleep(1)
    wait_replicas(APP, DEPLOYMENT, 2)
    wait_one_engine_process_per_replica()


FAULTS: dict[str, Callable[[Load, list[str]], None]] = {
    "engine process killed": _kill_engine_process,
    "engine replica killed": _kill_replica,
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_engine_process_fault_loses_no_request_and_leaves_no_orphan(load: Load, fault: str) -> None:
    killed: list[str] = []
    load.served_by.clear()
    counts = run_fault(
        load, PROMPTS, LOAD_S, fault, lambda: FAULTS[fault](load, killed), lambda: _replaced(killed), TABLE
    )
    assert killed, "the fault found nothing to kill"
    assert_bounds(counts, CLIENTS, "error event")  # streams on the replica it hit: the router says so
