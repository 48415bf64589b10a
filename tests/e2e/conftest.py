"""A real `maverick-serve up` (Ray + Serve + two engine replicas) for the HTTP tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maverick_serve.serving.up_process import run_up

MODEL_NAME = "llama-4-tiny"


@dataclass
class RunningCluster:
    base_url: str
    dashboard_url: str
    metrics_url: str
    model_dir: Path
    config: dict
    log: Path
    pid: int  # the `up` process; Ray and the replicas run in its session


@contextlib.contextmanager
def launch_cluster(
    model_dir: Path, root: Path, config: dict, env: dict[str, str] | None = None
) -> Iterator[RunningCluster]:
    """`maverick-serve up --config` in its own session, ready when /ready answers 200."""
    with run_up(config, root, env) as up:
        # /ready answers a moment before `up` prints its banner, which tests read.
        deadline = time.monotonic() + 30
        while "Ctrl-C stops the cluster" not in up.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        yield RunningCluster(up.api_url, up.dashboard_url, up.metrics_url, model_dir, config, up.log, up.pid)


# One cluster for the API modules (test_openai_api, test_openapi_fuzz), torn down after the e2e
# package: an idle cluster costs the later tiers CPU. test_observability starts its own.
@pytest.fixture(scope="package")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("cluster")
    config = {
        "model": {"path": str(tiny_model), "served_model_name": MODEL_NAME},
        "engine": {"kv_cache_memory_gib": 0.1, "max_model_len": 4096, "num_threads": 1},
        "router": {"max_body_bytes": 2_000_000, "max_image_bytes": 1_000_000, "max_images_per_request": 4},
        "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
        # On, unlike the default: access logs are where keys and bodies leak (test_secrets_not_logged).
        "observability": {"access_log": True},
    }
    with launch_cluster(tiny_model, root, config) as running:
        yield running
