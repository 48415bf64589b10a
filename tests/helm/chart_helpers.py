"""Chart paths and render helpers shared by the chart tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from maverick_serve.kube.chart import CHART_DIR

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((CHART_DIR / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "maverick", "default"


def helm_template(helm: str, *values: Path, sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE]
    for v in values:
        cmd += ["-f", str(v)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render_docs(helm: str, *values: Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    run = helm_template(helm, *values, sets=sets)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]
