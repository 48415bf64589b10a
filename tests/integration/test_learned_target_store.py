"""A learned target outlives the process that learned it: saved from one Ray actor (as Serve's
controller saves it), read back by a fresh one after the first is killed (a restarted controller)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from maverick_serve.autoscaling.learned_store import NAMESPACE, RayKvTargetStore

BASIS = {"target_per_replica": 8.0, "slo_ttft_p95_s": 1.0}


@ray.remote(num_cpus=0)
class Controller:
    def save(self, target: float) -> int:
        import os

        RayKvTargetStore().save("maverick/engine", target, BASIS)
        return os.getpid()

    def load(self, basis: dict[str, float]) -> tuple[float | None, int]:
        import os

        return RayKvTargetStore().load("maverick/engine", basis), os.getpid()


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=1, include_dashboard=False, namespace="learned-target-test")
    yield
    ray.shutdown()


def test_a_target_saved_by_a_killed_controller_is_read_by_the_next(local_ray: None) -> None:
    first = Controller.remote()
    first_pid = ray.get(first.save.remote(6.75))
    ray.kill(first)
    second = Controller.remote()
    target, second_pid = ray.get(second.load.remote(BASIS))
    assert second_pid != first_pid
    assert target == 6.75
    assert ray.get(second.load.remote({**BASIS, "slo_ttft_p95_s": 2.0}))[0] is None
    # Stored as JSON in our own namespace of Ray's GCS key-value store (no pickle).
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get("maverick/engine", namespace=NAMESPACE)
    assert raw is not None and raw.startswith(b"{") and b'"target": 6.75' in raw
