"""Real servers for integration tests: a `redis-server` on a free port that tests can stop and restart."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maverick_serve.kvtier.redis_process import RedisProcess


class RedisServer(RedisProcess):
    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)


def _server(tmp_path: Path, password: str | None = None, tls: bool = False) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (bash scripts/setup.sh installs it)")
    server = RedisServer(tmp_path, password=password, tls=tls)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from _server(tmp_path)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    yield from _server(tmp_path, password="s3cret")


@pytest.fixture
def redis_with_tls(tmp_path: Path) -> Iterator[RedisServer]:
    yield from _server(tmp_path, password="s3cret", tls=True)
