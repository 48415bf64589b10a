"""The images install what CI installs: parsed with the official Dockerfile parser (no engine here)."""

from __future__ import annotations

from pathlib import Path

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "flavour"), [("Dockerfile.gpu", "cuda"), ("Dockerfile.cpu", "cpu")])
def test_dockerfile_installs_the_lock_as_a_non_root_user(name: str, flavour: str) -> None:
    commands = dockerfile.parse_file(str(ROOT / "docker" / name))
    (base,) = [c.value[0] for c in commands if c.cmd == "FROM"]
    _, _, tag = base.partition(":")
    assert tag and tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: unpinned base {base}"
    runs = " ".join(" ".join(c.value) for c in commands if c.cmd == "RUN")
    assert f"bash scripts/install-venv.sh /opt/venv {flavour}" in runs  # the script setup.sh runs
    assert "pip install" not in runs.replace(
        "pip install --no-cache-dir --require-hashes --no-deps -r locks/uv.txt", ""
    )
    copied = {c.value[0] for c in commands if c.cmd == "COPY"}
    assert {"locks/", "scripts/", "src/"} <= copied
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name} runs as root"
    assert (ROOT / "locks" / f"main-{flavour}.txt").exists()
