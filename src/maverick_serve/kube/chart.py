"""Find the chart and helm, render the chart, and pick the application out of the rendered RayService."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from maverick_serve.cli_common import CLIError

SOURCE_ROOT = Path(__file__).resolve().parents[3]
CHART_DIR = SOURCE_ROOT / "helm" / "maverick-serve"


def find_helm() -> str:
    """$MAVERICK_HELM, helm on PATH, or the one scripts/setup-helm.sh unpacked."""
    for candidate in (os.environ.get("MAVERICK_HELM"), shutil.which("helm")):
        if candidate:
            return candidate
    local = SOURCE_ROOT / ".cache" / "tools" / "bin" / "helm"
    if local.exists():
        return str(local)
    raise CLIError(
        "helm not found: install Helm v4 (or run bash scripts/setup-helm.sh), or set MAVERICK_HELM"
    )


def render(
    values_files: list[Path],
    chart: Path = CHART_DIR,
    release: str = "maverick",
    namespace: str = "default",
    set_values: list[str] | None = None,
) -> list[dict[str, Any]]:
    """`helm template` (the chart's schema and its checks run); raises CLIError with helm's message."""
    cmd = [find_helm(), "template", release, str(chart), "--namespace", namespace]
    for f in values_files:
        cmd += ["-f", str(f)]
    for s in set_values or []:
        cmd += ["--set", s]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise CLIError(f"helm template failed: {run.stderr.strip()}")
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Serve config (serveConfigV2) of the rendered RayService."""
    services = [d for d in docs if d.get("kind") == "RayService"]
    if len(services) != 1:
        raise CLIError(f"expected one RayService in the rendered chart, found {len(services)}")
    config: dict[str, Any] = yaml.safe_load(services[0]["spec"]["serveConfigV2"])
    return config


def app_args(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The `args:` of the application: the ClusterConfig the RayService will build."""
    apps = serve_config(docs)["applications"]
    args: dict[str, Any] = apps[0]["args"]
    return args
