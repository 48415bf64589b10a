"""API keys and request bodies stay out of every log by default: the `up` log and every file of
the Ray session (Serve access logs, replica logs, worker stdout/stderr)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx

from conftest import MODEL_NAME

RAY_LOGS = Path("/tmp/ray/session_latest/logs")  # the package cluster is the latest Ray session


def _logs_containing(needles: list[str], files: list[Path]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {n: [] for n in needles}
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        for n in needles:
            if n in text:
                found[n].append(str(f))
    return found


def test_keys_and_bodies_appear_in_no_log(cluster: Any) -> None:
    tag = uuid.uuid4().hex[:12]
    key, prompt, rid = f"sk-canary-key-{tag}", f"canary prompt {tag}", f"canary-rid-{tag}"
    headers = {"authorization": f"Bearer {key}", "x-request-id": rid}
    ok = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        headers=headers,
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    bad = httpx.post(  # an error path too: bodies must not end up in error logs either
        f"{cluster.base_url}/v1/chat/completions",
        headers=headers,
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "temperature": -1},
        timeout=60,
    )
    assert bad.status_code == 400
    files = [p for p in RAY_LOGS.rglob("*") if p.is_file()] + [Path(cluster.log)]
    found = _logs_containing([key, prompt, rid], files)
    # The request id is logged (Serve's access log): the scan reads this cluster's logs.
    assert found[rid], f"request id {rid} in none of {len(files)} log files: wrong log folder?"
    assert found[key] == [] and found[prompt] == [], found
