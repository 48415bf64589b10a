"""A real Prometheus (the Debian build that scripts/setup-prometheus.sh unpacks) scraping one
target and evaluating ops/prometheus's rules, on a free port with its own data folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from maverick_serve.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def prometheus_binary() -> str | None:
    local = ROOT / ".cache/tools/bin/prometheus"
    return str(local) if local.exists() else shutil.which("prometheus")


class PrometheusServer:
    def __init__(self, binary: str, workdir: Path, target: str, rule_files: list[Path]) -> None:
        self.port = free_port()
        # Every rule group at the scrape interval, so a short test sees recorded series (the
        # shipped files use 15 s / 30 s).
        rules = []
        for path in rule_files:
            doc = yaml.safe_load(path.read_text())
            for group in doc["groups"]:
                group["interval"] = "2s"
            copy = workdir / path.name
            copy.write_text(yaml.safe_dump(doc))
            rules.append(str(copy))
        config = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "rule_files": rules,
            "scrape_configs": [{"job_name": "maverick", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
