"""`KVTierConfig.store` → the KVStore it names; shared by both engines' connectors and the tier lookup."""

from __future__ import annotations

import os
from urllib.parse import quote, urlsplit, urlunsplit

from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.kvtier.store import KVStore, MemoryKVStore


def redis_url(url: str, password_env: str | None) -> str:
    """The URL with the password from `password_env` (percent-encoded) in place of any in it."""
    if password_env is None:
        return url
    password = os.environ.get(password_env)
    if password is None:
        raise RuntimeError(f"kvtier.store.password_env names {password_env}, which is not set")
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("password="))
        query = "&".join(filter(None, [query, "password=" + quote(password, safe="")]))
        return f"unix://{parts.path}?{query}"  # urlunsplit would drop the empty authority
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def make_store(cfg: KVTierConfig) -> KVStore:
    if cfg.store.type == "redis":
        from maverick_serve.kvtier.redis_store import RedisKVStore

        return RedisKVStore(
            redis_url(cfg.store.url, cfg.store.password_env),
            cfg.store.max_connections,
            cfg.store.socket_timeout_s,
            cfg.store.max_value_bytes,
            cfg.store.bulk,
        )
    return MemoryKVStore(cfg.store.capacity_bytes)
