"""The chart and the code agree: the tiny CPU example's rendered serveConfigV2, deployed with the Serve
CLI on a local Ray, serves the API, and the `helm test` pod's own command passes against it.

Only what a cluster provides is stood in for: the worker groups' custom resources (`ray start
--resources`), the Redis password as the pods get it (MAVERICK_REDIS_PASSWORD from the Secret) and
a loopback Redis instead of the release's Service name; ports are free loopback ports.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from chart_helpers import EXAMPLES, render_docs
from PIL import Image

from maverick_serve.kvtier.redis_process import RedisProcess
from maverick_serve.net import free_port

VENV_BIN = Path(sys.executable).parent
PASSWORD = "chart-test-redis-password"
_DRIVER = """
import json, sys, time
import ray
ray.init(num_cpus=8, resources=json.loads(sys.argv[1]), include_dashboard=True,
         dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[2]))
print("ray ready", flush=True)
try:
    while True:
        time.sleep(1)
except KeyboardInterrupt:
    ray.shutdown()
"""


def _image_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 40, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def deployed(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("chart-on-ray")
    docs = render_docs(helm, next(p for p in EXAMPLES if p.stem == "tiny-cpu"))
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    (test_pod,) = [d for d in docs if d["kind"] == "Pod"]
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources: dict[str, float] = {}
    for g in groups:
        resources.update(json.loads(json.loads(g["rayStartParams"]["resources"])))

    server = RedisProcess(root / "redis", password=PASSWORD)
    server.workdir.mkdir()
    server.start()
    port, dash = free_port(), free_port()
    args = serve_cfg["applications"][0]["args"]
    # The example turns our autoscaling on: Serve builds the app-level policy from this at deploy.
    policy = serve_cfg["applications"][0]["autoscaling_policy"]
    assert policy["policy_function"] == "maverick_serve.autoscaling.serve_policy:ClusterAutoscaler"
    assert policy["policy_kwargs"]["cluster"] == args
    store = args["kvtier"]["store"]
    assert store["url"].startswith("redis://maverick-maverick-serve-redis.default.svc:6379/")
    store["url"] = f"redis://127.0.0.1:{server.port}/0"  # the release's Service, here
    args["model"]["cache_dir"] = str(root / "models")
    serve_cfg["http_options"]["port"] = args["http"]["port"] = port
    cfg_path = root / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg))

    # The example sets ray.tokenAuth: false; Ray 2.60's `ray start` would turn token auth on.
    assert "authOptions" not in svc["spec"]["rayClusterConfig"]
    # Serve's data-plane switches as the pods get them (RAY_SERVE_* literals of the head's env).
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    serve_env = {
        e["name"]: e["value"] for e in head["env"] if e["name"].startswith("RAY_SERVE_") and "value" in e
    }
    assert serve_env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    env = {
        **os.environ,
        **serve_env,
        "MAVERICK_REDIS_PASSWORD": PASSWORD,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    # A local Ray owned by one driver process: stopping it stops only this cluster (`ray stop`
    # would also stop other tests' clusters on the machine).
    driver_log = root / "ray-driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, json.dumps(resources), str(dash)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=driver_log.open("w"),
        text=True,
    )
    assert driver.stdout is not None
    line = driver.stdout.readline()  # the driver prints one line once Ray is up, or exits
    assert line.strip() == "ray ready", driver_log.read_text()[-3000:]
    try:
        address = f"http://127.0.0.1:{dash}"
        deploy = subprocess.run(
            [str(VENV_BIN / "serve"), "deploy", str(cfg_path), "-a", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stderr[-2000:]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 420
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                status = subprocess.run(
                    [str(VENV_BIN / "serve"), "status", "-a", address],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                pytest.fail(f"the chart's app did not come up:\n{status.stdout}\n{status.stderr}")
            time.sleep(2)
        yield {"url": url, "test_pod": test_pod, "redis": server, "args": args}
    finally:
        subprocess.run(
            [str(VENV_BIN / "serve"), "shutdown", "-y", "-a", f"http://127.0.0.1:{dash}"],
            capture_output=True,
            timeout=120,
        )
        driver.send_signal(signal.SIGINT)  # ray.shutdown() runs at exit
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
        server.stop()


def test_models_chat_and_image_chat(deployed: dict[str, Any]) -> None:
    url = deployed["url"]
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["llama-4-tiny"]
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "llama-4-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 4
    image = {
        "model": "llama-4-tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_data_url()}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
        "max_tokens": 3,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=image, timeout=180)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens"] > 2 * 144  # a 2-tile image and more
    # The engines reached the release's Redis with the password from the environment only.
    server: RedisProcess = deployed["redis"]
    assert "@" not in deployed["args"]["kvtier"]["store"]["url"]
    client = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD)
    deadline = time.monotonic() + 30
    while client.dbsize() == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.dbsize() > 0, "no KV blocks reached Redis"


def test_the_helm_test_pods_command_passes(deployed: dict[str, Any]) -> None:
    (container,) = deployed["test_pod"]["spec"]["containers"]
    command = [*container["command"], *container["args"]]
    assert command[:3] == ["python", "-m", "maverick_serve.serving.smoke_check"]
    url_at = command.index("--url") + 1
    assert command[url_at] == "http://maverick-maverick-serve-serve:8000"
    command[0], command[url_at] = sys.executable, deployed["url"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "serves llama-4-tiny" in run.stdout
    # And it fails when the app does not answer.
    dead = subprocess.run(
        [*command[:url_at], f"http://127.0.0.1:{free_port()}", *command[url_at + 1 :], "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1 and "unreachable" in dead.stderr
