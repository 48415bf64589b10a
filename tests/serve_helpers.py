"""The app on a local Ray Serve, for the Serve integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray import serve

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.net import free_port
from maverick_serve.serving.builder import build_app
from maverick_serve.serving.local_cluster import deploy_config, wait_ready


@contextmanager
def serve_app(
    cfg: ClusterConfig,
    name: str,
    resources: dict[str, float] | None = None,
    dashboard_port: int | None = None,
) -> Iterator[str]:
    """A local Ray (8 logical CPUs plus any custom `resources`) serving the app built from `cfg` on
    a free port; yields its URL; Serve and Ray stop afterwards. With a `dashboard_port` the app is
    deployed as a Serve config through the dashboard there (as `maverick-serve up` and KubeRay
    do), which carries the app-level autoscaling policy."""
    dashboard = dashboard_port
    port = free_port()
    # Serve reads its data-plane switches from each process's environment: set before Ray starts,
    # and put back afterwards (a later driver subprocess with sync handles needs Serve's defaults).
    serve_env = cfg.serve_runtime.environment(port)
    saved = {k: os.environ.get(k) for k in serve_env}
    os.environ.update(serve_env)
    ray.init(
        num_cpus=8,
        resources=resources,
        include_dashboard=dashboard is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        proxy = cfg.serve_runtime.proxy_port(port, free_port())
        serve.start(http_options={"host": "127.0.0.1", "port": proxy})
        if dashboard is not None:
            cfg = cfg.model_copy(
                update={"app_name": name, "http": cfg.http.model_copy(update={"port": port})}
            )
            deploy_config(f"http://127.0.0.1:{dashboard}", cfg)
            wait_ready(f"http://127.0.0.1:{port}", 300)
        else:  # the app's name is the config's: routers look their deployments up by it
            serve.run(build_app(cfg.model_copy(update={"app_name": name})), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def actor_gone(name: str) -> bool:
    """No live named actor `name` in this driver's namespace (stopped, or never started)."""
    import ray

    try:
        ray.get_actor(name)
    except ValueError:
        return True
    return False
