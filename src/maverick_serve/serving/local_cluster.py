"""`maverick-serve up`: an embedded local Ray cluster serving the app until Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.net import free_port
from maverick_serve.serving.model_store import ensure_model


def load_config(path: Path | None) -> ClusterConfig:
    """A full ClusterConfig from YAML or JSON (a Serve config's `args` block works too)."""
    if path is None:
        return ClusterConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "applications" in data:  # a Serve config file: take the first application's args
        data = data["applications"][0].get("args", {})
    return ClusterConfig.model_validate(data)


def dashboard_auth_headers() -> dict[str, str]:
    """Ray's dashboard takes a bearer token when token auth is on (Ray's default since 2.5x)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def deploy_config(dashboard_url: str, config: ClusterConfig, timeout_s: float = 30.0) -> None:
    """Deploy the app the way `serve deploy` and KubeRay do: its Serve config (with the app-level
    autoscaling policy, which `serve.run` cannot carry) PUT to the dashboard's REST API."""
    from maverick_serve.serving.builder import serve_application

    body = {
        "http_options": {"host": config.http.host, "port": config.http.port},
        "applications": [serve_application(config)],
    }
    put_serve_config(dashboard_url, body, timeout_s)


def put_serve_config(dashboard_url: str, body: dict[str, Any], timeout_s: float = 30.0) -> None:
    """PUT a Serve config (`ServeDeploySchema` as JSON) to the dashboard, waiting for its Serve
    module to come up (a little after Ray)."""
    req = urllib.request.Request(
        f"{dashboard_url.rstrip('/')}/api/serve/applications/",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", **dashboard_auth_headers()},
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(req, timeout=timeout_s):
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                detail = exc.read().decode()[-2000:]
                raise RuntimeError(f"deploying the Serve config failed: {detail}") from None
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def wait_ready(api_url: str, timeout_s: float, on_wait: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result: dict[str, Any] = _get_json(f"{api_url}/ready")
            return result
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
            if on_wait:
                on_wait()
            time.sleep(1.0)
    raise TimeoutError(f"the app did not become ready within {timeout_s:.0f}s (last error: {last})")


def keep_off_engine_cores(config: ClusterConfig) -> None:
    """With `engine.cpu_cores` set on CPU, this process (and so Ray, which it starts, and every
    worker Ray starts) keeps to the other cores; each engine pins itself onto its claimed ones."""
    engine = config.engine
    cores = engine.pinned_cores()
    if not cores:
        return
    rest = os.sched_getaffinity(0) - set(cores)
    if rest:
        os.sched_setaffinity(0, rest)
        print(f"engines on CPU cores {cores}; Ray and the routers on {sorted(rest)}", flush=True)


def run_local(config: ClusterConfig, ready_timeout_s: float = 300.0) -> int:
    import ray
    from ray import serve

    from maverick_serve.serving.builder import build_app

    config = ensure_model(config)
    http = config.http
    print(
        f"starting Ray ({http.logical_cpus} logical CPUs) with the dashboard on "
        f"http://127.0.0.1:{http.dashboard_port} ...",
        flush=True,
    )
    # Engine replicas set their own torch threads; keep Ray's workers from oversubscribing cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Serve reads its tracing switch from each process's environment: set it before Ray starts
    # so the proxy and every replica inherit it.
    tracing = config.observability.tracing.resolve()
    os.environ.update(tracing.environment())
    os.environ.update(config.serve_runtime.environment(http.port))
    keep_off_engine_cores(config)
    ray.init(
        num_cpus=http.logical_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=http.dashboard_port,
        _metrics_export_port=http.metrics_export_port,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        serve.start(
            http_options={"host": http.host, "port": config.serve_runtime.proxy_port(http.port, free_port())},
            logging_config={"enable_access_log": config.observability.access_log},
        )
        e = config.autoscaling.engine
        replicas = (
            f"{e.min_replicas}-{e.max_replicas} (autoscaled)"
            if config.autoscaling.enabled
            else str(config.resources.engine.replicas)
        )
        print(
            f"deploying {config.app_name}: router + {replicas} engine replica(s) of {config.model.path} ...",
            flush=True,
        )
        if config.autoscaling.enabled:  # the app-level policy travels in a Serve config only
            deploy_config(f"http://127.0.0.1:{http.dashboard_port}", config)
        else:
            serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
        api = f"http://{'127.0.0.1' if http.host in ('0.0.0.0', '::') else http.host}:{http.port}"
        info = wait_ready(api, ready_timeout_s, on_wait=lambda: print(".", end="", flush=True))
        print(
            f"\nready: model {config.model.served_model_name!r} "
            f"(max_model_len {info['engine']['max_model_len']})"
        )
        print(f"  API:            {api}/v1  (OpenAI-compatible; try {api}/v1/models)")
        print(f"  Ray dashboard:  http://127.0.0.1:{http.dashboard_port}")
        print(
            f"  Prometheus:     http://127.0.0.1:{http.metrics_export_port}/metrics  "
            "(metric names: README, Operations; dashboards and alerts: ops/)"
        )
        print(f"  Traces:         {tracing.describe()}")
        print("  Ctrl-C stops the cluster.", flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down ...", flush=True)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def print_status(dashboard_url: str) -> int:
    """Applications, deployments, replica counts and states, from the dashboard's REST API."""
    try:
        data = _get_json(
            f"{dashboard_url.rstrip('/')}/api/serve/applications/", 5.0, dashboard_auth_headers()
        )
    except (urllib.error.URLError, OSError) as exc:
        print(f"no Ray dashboard at {dashboard_url} ({exc}); is `maverick-serve up` running?")
        return 1
    apps = data.get("applications") or {}
    if not apps:
        print("no Serve applications are running")
        return 1
    for name, app in apps.items():
        print(f"application {name}: {app.get('status')} (route {app.get('route_prefix')})")
        for dname, dep in (app.get("deployments") or {}).items():
            counts: dict[str, int] = {}
            for replica in dep.get("replicas") or []:
                counts[replica.get("state", "?")] = counts.get(replica.get("state", "?"), 0) + 1
            states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) or "no replicas"
            print(
                f"  {dname:<14} {dep.get('status'):<10} replicas: {states} "
                f"(target {dep.get('target_num_replicas')})"
            )
    return 0
