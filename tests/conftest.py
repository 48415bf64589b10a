"""Shared fixtures: tiny checkpoints built once per test session from a fixed seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maverick_serve.config import preset
from maverick_serve.model.make_model import make_model

SEED = 1234


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'tiny': dir, 'tiny-qknorm': dir}; each dir also holds the `text-only` twin."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("tiny", "tiny-qknorm"):
        make_model(preset(name), root / name, seed=SEED, text_only_variant=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["tiny"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=120.0,
        help="length of tests/chaos/test_soak.py's mixed load (CI: the default; longer on a spare machine)",
    )
