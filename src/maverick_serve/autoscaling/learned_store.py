"""Where a learned `target_per_replica` outlives the policy that learned it.

Serve keeps a policy's state in its controller's memory only: a restarted controller builds the
policy afresh, and without this the learned capacity would start again from the configured
guess and relearn it over many intervals (breaking the SLO on the way if the guess was high).
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from typing import Any

logger = logging.getLogger("ray.serve.maverick.autoscaler")
NAMESPACE = "maverick_serve_autoscaler"


class LearnedTargetStore(ABC):
    """Contract: `save(key, target, basis)` records the target learned under `basis` (the settings
    it was learned with, JSON-serialisable); `load(key, basis)` returns it only when it was saved
    under the same basis (a changed SLO or bound makes it stale), else None. Neither raises: a
    store that cannot be reached loses the target, never the tick. Values are JSON, never pickle."""

    @abstractmethod
    def load(self, key: str, basis: dict[str, Any]) -> float | None: ...

    @abstractmethod
    def save(self, key: str, target: float, basis: dict[str, Any]) -> None: ...


def _decode(raw: bytes | str | None, basis: dict[str, Any]) -> float | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        target = float(doc["target"])
    except (ValueError, KeyError, TypeError):
        return None
    if doc.get("basis") != basis or not math.isfinite(target) or target <= 0:
        return None
    return target


def _encode(target: float, basis: dict[str, Any]) -> str:
    return json.dumps({"target": target, "basis": basis}, sort_keys=True)


class MemoryTargetStore(LearnedTargetStore):
    """In one process (tests, and a policy run outside Ray)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def load(self, key: str, basis: dict[str, Any]) -> float | None:
        return _decode(self.values.get(key), basis)

    def save(self, key: str, target: float, basis: dict[str, Any]) -> None:
        self.values[key] = _encode(target, basis)


class RayKvTargetStore(LearnedTargetStore):
    """Ray's GCS key-value store (the one Serve checkpoints its own state in): it outlives Serve's
    controller, and the head too where GCS fault tolerance (external Redis) is on."""

    def load(self, key: str, basis: dict[str, Any]) -> float | None:
        kv = _internal_kv()
        if kv is None:
            return None
        try:
            return _decode(kv._internal_kv_get(key, namespace=NAMESPACE), basis)
        except Exception:  # an unreachable GCS loses the target, never the tick
            logger.warning("autoscaler: could not read the learned target %s", key, exc_info=True)
            return None

    def save(self, key: str, target: float, basis: dict[str, Any]) -> None:
        kv = _internal_kv()
        if kv is None:
            return
        try:
            kv._internal_kv_put(key, _encode(target, basis), overwrite=True, namespace=NAMESPACE)
        except Exception:  # see load
            logger.warning("autoscaler: could not store the learned target %s", key, exc_info=True)


def _internal_kv() -> Any:
    """`ray.experimental.internal_kv` where this process is connected to Ray, else None."""
    try:
        from ray.experimental import internal_kv
    except ImportError:
        return None
    return internal_kv if internal_kv._internal_kv_initialized() else None
