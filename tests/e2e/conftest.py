"""A real `maverick-serve up` (Ray + Serve + two engine replicas) for the HTTP tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from maverick_serve.net import free_port

MODEL_NAME = "llama-4-tiny"


@dataclass
class RunningCluster:
    base_url: str
    dashboard_url: str
    metrics_url: str
    model_dir: Path
    config: dict
    log: Path


@contextlib.contextmanager
def launch_cluster(
    model_dir: Path, root: Path, config: dict, env: dict[str, str] | None = None
) -> Iterator[RunningCluster]:
    """`maverick-serve up --config` in its own session, ready when /ready answers 200."""
    cfg_path = root / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    port, dash, metrics = free_port(), free_port(), free_port()
    log = root / "up.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maverick_serve.cli",
            "up",
            "--config",
            str(cfg_path),
            "--port",
            str(port),
            "--dashboard-port",
            str(dash),
            "--metrics-port",
            str(metrics),
            "--ready-timeout",
            "240",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"maverick-serve up exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        yield RunningCluster(base, f"http://127.0.0.1:{dash}", metrics_url, model_dir, config, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")  # torn down after the e2e module: an idle cluster costs the later tiers CPU
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("cluster")
    config = {
        "model": {"path": str(tiny_model), "served_model_name": MODEL_NAME},
        "engine": {"kv_cache_memory_gib": 0.1, "max_model_len": 4096, "num_threads": 1},
        "router": {"max_body_bytes": 2_000_000, "max_image_bytes": 1_000_000, "max_images_per_request": 4},
        "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
    }
    with launch_cluster(tiny_model, root, config) as running:
        yield running
