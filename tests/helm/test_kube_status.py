"""`maverick-serve status --kube` through the official kubernetes client, against KubeRay-shaped
documents (fixtures/) served on a loopback port the way the API server's REST paths serve them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from maverick_serve.cli_common import CLIError
from maverick_serve.kube.status import collect, render_lines

FIXTURES = Path(__file__).parent / "fixtures"
NAME = "maverick-maverick-serve"


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


class _Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        routes = {
            f"/apis/ray.io/v1/namespaces/default/rayservices/{NAME}": _load("rayservice-upgrading.json"),
            f"/apis/ray.io/v1/namespaces/default/rayclusters/{NAME}-abc12": _load("raycluster-active.json"),
            f"/apis/ray.io/v1/namespaces/default/rayclusters/{NAME}-def34": _load("raycluster-pending.json"),
        }
        if url.path == "/api/v1/namespaces/default/pods":
            selector = dict(kv.split("=") for kv in parse_qs(url.query)["labelSelector"][0].split(","))
            pods = _load("pods.json")
            pods["items"] = [
                p
                for p in pods["items"]
                if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())
            ]
            body, code = pods, 200
        elif url.path in routes:
            body, code = routes[url.path], 200
        else:
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
            }
            code = 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def api() -> Iterator[client.Configuration]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    yield config
    server.shutdown()


def test_status_reads_conditions_clusters_apps_and_groups(api: client.Configuration) -> None:
    state = collect("default", NAME, client_config=api)
    assert state["service_status"] == "Running" and state["endpoints"] == 2
    assert [(c["type"], c["status"]) for c in state["conditions"]] == [
        ("Ready", "True"),
        ("UpgradeInProgress", "True"),
    ]
    active, pending = state["clusters"]["active"], state["clusters"]["pending"]
    assert active["name"].endswith("-abc12") and pending["name"].endswith("-def34")
    assert active["groups"] == {"router": {"ready": 1, "desired": 1}, "engine": {"ready": 2, "desired": 2}}
    assert pending["groups"]["engine"] == {"ready": 1, "desired": 2}
    assert pending["applications"]["maverick"]["deployments"]["LlamaEngine"]["status"] == "UPDATING"
    text = "\n".join(render_lines(state))
    assert "RayService default/maverick-maverick-serve: Running, 2 serve endpoint(s)" in text
    assert "condition UpgradeInProgress=True (BothActivePendingClustersExist" in text
    assert "worker group engine     1/2 pods ready" in text
    assert "LlamaEngine      UPDATING - Deployment 'LlamaEngine' is waiting for 1 replica to start" in text


def test_missing_rayservice_is_a_clear_error(api: client.Configuration) -> None:
    with pytest.raises(CLIError, match="no RayService nope in namespace default"):
        collect("default", "nope", client_config=api)
