"""A real `maverick-serve up` (Ray + Serve + two engine replicas) for the HTTP tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
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


ENGINE_STATS_SCRIPT = """
import json, ray
from ray import serve
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
handle = serve.get_deployment_handle("LlamaEngine", app_name="maverick")
seen = {}
for _ in range(40):  # requests spread over replicas; keep the freshest stats of each
    stats = handle.stats.remote().result()
    seen[stats["replica"]] = stats
print(json.dumps(seen))
"""


def engine_stats() -> dict[str, dict[str, Any]]:
    """Fresh stats of every engine replica, read through Serve handles from a separate driver."""
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_STATS_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def assert_disconnect_aborts(base_url: str, replicas: int) -> None:
    """A client leaving a 4000-token stream after 4 chunks stops its generation and frees its blocks."""
    before = engine_stats()
    assert len(before) == replicas  # every replica answered
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "a very long answer"}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 4:
                break  # leave: closing the connection must abort the 4000-token generation
    time.sleep(1.0)
    after = engine_stats()
    assert all(s["running"] == 0 and s["waiting"] == 0 for s in after.values()), after
    generated = sum(after[r]["generated_tokens_total"] - before[r]["generated_tokens_total"] for r in after)
    assert 3 <= generated < 1000  # stopped long before max_tokens
    assert all(sum(s["kv_blocks_used"].values()) == 0 for s in after.values())  # blocks freed
