"""Optional API keys and per-key request/token limits.

Keys are kept only as SHA-256 digests (config, a mounted secret file, or an environment variable
holding JSON), compared in constant time. Limits are token buckets that refill continuously: a
key may burst up to its per-minute allowance, then gets 429 with the seconds until it may retry.
With several router replicas each enforces the limits for the traffic it sees (the Serve proxy
spreads requests evenly, so divide by the router count for a cluster-wide figure).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from maverick_serve.api.errors import APIError
from maverick_serve.config.routing import ApiKey, AuthConfig


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TokenBucket:
    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, amount: float) -> float:
        """0 if `amount` fits now, else seconds until it will (inf if it never can)."""
        self._refill()
        if amount <= self.level:
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount


@dataclass
class KeyState:
    name: str
    requests: TokenBucket
    tokens: TokenBucket


def load_keys(cfg: AuthConfig) -> list[ApiKey]:
    keys = list(cfg.keys)
    sources: list[tuple[str, str]] = []
    if cfg.keys_file is not None:
        sources.append((f"auth.keys_file ({cfg.keys_file})", cfg.keys_file.read_text()))
    if cfg.keys_env is not None:
        if cfg.keys_env not in os.environ:
            raise ValueError(f"auth.keys_env names {cfg.keys_env!r}, which is not set")
        sources.append((f"auth.keys_env ({cfg.keys_env})", os.environ[cfg.keys_env]))
    for where, text in sources:
        try:
            keys += [ApiKey.model_validate(k) for k in json.loads(text)]
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: expected a JSON list of {{name, sha256, ...}}: {exc}") from exc
    if cfg.enabled and not keys:
        raise ValueError("auth.enabled is true but no keys are configured (keys, keys_file or keys_env)")
    return keys


class ApiKeyAuth:
    def __init__(self, cfg: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = cfg.enabled
        self.keys: dict[str, KeyState] = {}
        for k in load_keys(cfg) if cfg.enabled else []:
            self.keys[k.sha256] = KeyState(
                k.name,
                TokenBucket(k.requests_per_min or cfg.default_requests_per_min, clock),
                TokenBucket(k.tokens_per_min or cfg.default_tokens_per_min, clock),
            )

    def authenticate(self, authorization: str | None) -> KeyState | None:
        """The caller's key state; raises 401 when keys are required and this one is not valid."""
        if not self.enabled:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", "authorization", "missing_api_key"
            )
        digest = hash_key(key.strip())
        for known, state in self.keys.items():
            if hmac.compare_digest(known, digest):
                return state
        raise APIError(401, "invalid API key", "authorization", "invalid_api_key")

    @staticmethod
    def admit(state: KeyState | None, tokens: int) -> None:
        """Charge one request and `tokens` (prompt + max_tokens) or raise 429 with Retry-After."""
        if state is None:
            return
        for bucket, amount, what in ((state.requests, 1, "requests"), (state.tokens, tokens, "tokens")):
            wait = bucket.wait_s(amount)
            if wait:
                if math.isinf(wait):
                    raise APIError(
                        429,
                        f"this request needs {amount} tokens but key {state.name!r} allows "
                        f"{int(bucket.capacity)} tokens per minute",
                        "max_tokens",
                        "rate_limit_exceeded",
                    )
                raise APIError(
                    429,
                    f"key {state.name!r} is over its {what}-per-minute limit ({int(bucket.capacity)})",
                    None,
                    "rate_limit_exceeded",
                    {"retry-after": str(max(1, math.ceil(wait)))},
                )
        state.requests.take(1)
        state.tokens.take(tokens)
