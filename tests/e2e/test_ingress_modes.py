"""`serve_runtime.ingress: direct | haproxy` (and direct with `router.colocated`) through
`maverick-serve up` and the real `openai` client: who holds http.port, streamed == non-streamed,
bad input still a 4xx, the request id echoed. (`proxy`, the default, is what every other e2e
test runs on.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from conftest import MODEL_NAME, RunningCluster, launch_cluster


def _listener(port: int) -> str:
    """The command line of the process listening on 127.0.0.1/0.0.0.0:port."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return " ".join(psutil.Process(conn.pid).cmdline())
    return ""


@pytest.fixture(scope="module", params=["direct", "haproxy", "direct/colocated"])
def ingress_cluster(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RunningCluster]]:
    mode, _, colocated = str(request.param).partition("/")
    config = {
        "model": {"path": str(tiny_model), "served_model_name": MODEL_NAME},
        "engine": {"kv_cache_memory_gib": 0.1, "max_model_len": 2048, "num_threads": 1},
        "resources": {"engine": {"replicas": 1, "num_cpus": 1}},
        "serve_runtime": {"ingress": mode},
        "router": {"colocated": bool(colocated)},
    }
    with launch_cluster(tiny_model, tmp_path_factory.mktemp(f"ingress-{mode}"), config) as running:
        yield str(request.param), running


def test_http_port_is_served_by_the_router_or_haproxy_not_serves_proxy(
    ingress_cluster: tuple[str, RunningCluster],
) -> None:
    mode, cluster = ingress_cluster
    holder = _listener(int(cluster.base_url.rsplit(":", 1)[1]))
    if mode == "direct":
        assert "ServeReplica:maverick:Router" in holder, holder
    elif mode == "direct/colocated":  # the engine replica is the router
        assert "ServeReplica:maverick:LlamaEngine" in holder, holder
    else:
        assert "haproxy" in holder, holder
    assert "ProxyActor" not in holder


def test_streamed_equals_plain_and_bad_input_is_a_4xx(ingress_cluster: tuple[str, RunningCluster]) -> None:
    _, cluster = ingress_cluster
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    text = plain.choices[0].message.content or ""
    assert plain.usage is not None and plain.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    bad = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": messages, "max_tokens": 10**9},
        timeout=60,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens", bad.text
    r = httpx.post(
        f"{cluster.base_url}/v1/completions",
        headers={"x-request-id": "ingress-7"},
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.headers.get_list("x-request-id") == ["ingress-7"] and r.json()["id"] == "cmpl-ingress-7"
