"""`maverick-serve up` as a child process in its own session: for benchmarks that need one cluster
per variant and for the end-to-end tests. Ready when /ready answers 200; stopped with SIGINT (as
Ctrl-C would), killed if it does not stop within a minute."""

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
from typing import Any

import yaml

from maverick_serve.net import free_port


@dataclass(frozen=True)
class UpProcess:
    api_url: str
    dashboard_url: str
    metrics_url: str
    log: Path
    pid: int  # the `up` process; Ray and every replica run in its session (os.getsid(pid))


@contextlib.contextmanager
def run_server(
    cmd: list[str],
    log: Path,
    ready_url: str,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 300.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd` in its own session (output to `log`), yield once `ready_url` answers 200;
    afterwards SIGINT it (as Ctrl-C would) and kill its whole session if it has not stopped
    within a minute. Also used for `vllm serve` by the vLLM backend's tests."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=2) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{ready_url} not ready in {ready_timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def run_up(
    config: dict[str, Any],
    workdir: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 300.0,
    python: Path | None = None,
    extra_args: list[str] | None = None,
) -> Iterator[UpProcess]:
    """`maverick-serve up` on `config` (and `extra_args`, e.g. --no-pin-cores), under `python`
    (default: this interpreter; the vLLM backend runs under the vllm venv's)."""
    cfg_path = workdir / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    port, dash, metrics = free_port(), free_port(), free_port()
    log = workdir / "up.log"
    cmd = [
        str(python or sys.executable),
        "-m",
        "maverick_serve.cli",
        "up",
        "--config",
        str(cfg_path),
        "--port",
        str(port),
    ]
    cmd += ["--dashboard-port", str(dash), "--metrics-port", str(metrics)]
    cmd += ["--ready-timeout", str(int(ready_timeout_s * 0.8)), *(extra_args or [])]
    api = f"http://127.0.0.1:{port}"
    with run_server(cmd, log, f"{api}/ready", env, ready_timeout_s) as proc:
        yield UpProcess(api, f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics", log, proc.pid)
