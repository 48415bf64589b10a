"""The chaos tier's Redis: one real redis-server per module, stopped after it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from maverick_serve.kvtier.redis_process import RedisProcess


@pytest.fixture(scope="module")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (bash scripts/setup.sh installs it)")
    store = RedisProcess(tmp_path_factory.mktemp("redis"))
    store.start()
    try:
        yield store
    finally:
        store.stop()
