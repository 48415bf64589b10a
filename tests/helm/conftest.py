"""The helm binary for the chart tests (installed by scripts/setup.sh through setup-helm.sh)."""

from __future__ import annotations

import subprocess

import pytest

from maverick_serve.kube.chart import find_helm


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()  # fails loudly when setup did not install it
    version = subprocess.run([path, "version", "--short"], capture_output=True, text=True).stdout
    assert version.startswith("v4."), version
    return path
