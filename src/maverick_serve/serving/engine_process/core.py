"""The engine process: `python -m maverick_serve.serving.engine_process.core --fd N`, started by
`client.EngineProcessClient` with one end of a socket pair as fd N.

It loads the native engine from the cluster config the replica sends first, then steps it in
its only busy thread: between steps it takes the replica's commands (add, abort, calls), after
each step it sends one frame with every delta, the load report and the cache events recorded
since the last frame. EOF on the socket (the replica exited or was killed) ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.native.serving import LocalCacheView
from maverick_serve.engine.types import RequestOutput
from maverick_serve.serving.engine_factory import load_native_engine
from maverick_serve.serving.engine_process.wire import (
    decode,
    encode,
    error_to_wire,
    output_to_wire,
    request_from_wire,
)

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


class EngineCore:
    def __init__(self, engine: NativeEngine, conn: Connection, stats_interval_s: float) -> None:
        self.engine = engine
        self.view = LocalCacheView(engine)  # what the replica's ProcessCacheView mirrors
        self.conn = conn
        self.stats_interval_s = stats_interval_s
        self._last_stats = 0.0
        self._send_lock = threading.Lock()  # the tier flusher thread replies too
        self._events: deque[tuple[bool, bytes]] | None = None
        self._tier_events: deque[bytes] | None = None
        self._errors: list[dict[str, Any]] = []  # refused adds, sent with the next frame

    def send(self, message: dict[str, Any], frames: list[bytes] | None = None) -> None:
        with self._send_lock:
            self.conn.send_bytes(encode(message))
            for frame in frames or []:
                self.conn.send_bytes(frame)

    def ready(self) -> None:
        self.send(
            {
                "t": "ready",
                "max_model_len": self.engine.max_model_len,
                "has_tier": self.view.has_tier,
                "tier_shared": self.view.tier_shared,
                "load": self.engine.load_report(),
            }
        )

    def run(self) -> None:
        """Until the replica says stop or goes away (EOF)."""
        engine = self.engine
        while True:
            handled = False
            if self.conn.poll(0.0 if engine.has_unfinished_requests() else IDLE_WAIT_S):
                while True:
                    if not self.handle(decode(self.conn.recv_bytes())):
                        return
                    handled = True
                    if not self.conn.poll(0.0):
                        break
            outputs = engine.step() if engine.has_unfinished_requests() else []
            if outputs or handled or self._errors:
                self.send_outputs(outputs)
            self._maybe_send_stats()

    def handle(self, message: dict[str, Any]) -> bool:
        """One command; False for stop."""
        kind = message["t"]
        if kind == "add":
            frames = [self.conn.recv_bytes() for _ in range(int(message["frames"]))]
            request_id = message["request"]["request_id"]
            try:
                self.engine.add_request(request_from_wire(message["request"], frames))
            except Exception as exc:  # the request's stream gets it; the engine goes on
                self._errors.append({"id": request_id, "error": error_to_wire(exc)})
        elif kind == "abort":
            self.engine.abort(str(message["id"]))
        elif kind == "call":
            self.call(int(message["id"]), str(message["fn"]), message.get("args", {}))
        elif kind == "stop":
            return False
        else:
            raise ValueError(f"unknown engine process command {kind!r}")
        return True

    def call(self, call_id: int, fn: str, args: dict[str, Any]) -> None:
        value: Any = None
        try:
            if fn == "stats":
                value = self.engine.stats().model_dump(mode="json")
            elif fn == "cache_events":
                self._events = self.view.cache_events(int(args["maxlen"]))
            elif fn == "tier_events":
                self._tier_events = self.view.tier_events(int(args["maxlen"]))
            elif fn == "cached_blocks":
                value = [h.hex() for h in self.view.cached_blocks()]
            elif fn == "flush_tier":
                # Waits on the tier's writer, not on the engine: the loop goes on stepping.
                threading.Thread(
                    target=self._flush, args=(call_id, float(args["timeout_s"])), daemon=True
                ).start()
                return
            else:
                raise ValueError(f"unknown engine process call {fn!r}")
        except Exception as exc:
            self.send({"t": "reply", "id": call_id, "error": error_to_wire(exc)})
            return
        self.send({"t": "reply", "id": call_id, "value": value})

    def _flush(self, call_id: int, timeout_s: float) -> None:
        try:
            self.view.flush_tier(timeout_s)
        except Exception as exc:
            self.send({"t": "reply", "id": call_id, "error": error_to_wire(exc)})
        else:
            self.send({"t": "reply", "id": call_id, "value": None})

    def send_outputs(self, outputs: list[RequestOutput]) -> None:
        message: dict[str, Any] = {
            "t": "out",
            "outputs": [output_to_wire(out) for out in outputs],
            "load": self.engine.load_report(),
        }
        if self._errors:
            message["errors"], self._errors = self._errors, []
        if self._events:
            drained = [self._events.popleft() for _ in range(len(self._events))]
            message["events"] = [(int(stored), h.hex()) for stored, h in drained]
        if self._tier_events:
            tier = self._tier_events
            message["tier_events"] = [tier.popleft().hex() for _ in range(len(tier))]
        self.send(message)

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= self.stats_interval_s:
            self._last_stats = now
            self.send({"t": "stats", "stats": self.engine.stats().model_dump(mode="json")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="this process's end of the socket pair")
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    try:
        init = decode(conn.recv_bytes())
    except EOFError:
        return 1
    cluster = ClusterConfig.model_validate(init["config"])
    logging.basicConfig(
        level=cluster.observability.log_level, format="%(asctime)s engine-process %(levelname)s %(message)s"
    )
    core: EngineCore | None = None
    try:
        if not isinstance(cluster.engine, NativeEngineConfig):
            raise ValueError(f"the engine process runs the native backend, not {cluster.engine.backend!r}")
        engine = load_native_engine(Path(init["model_dir"]), cluster.engine, cluster.experts, cluster.kvtier)
        core = EngineCore(engine, conn, float(init["stats_interval_s"]))
        core.ready()
        core.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0  # the replica is gone: nobody to serve
    except BaseException as exc:
        logger.exception("engine process stopped")
        dead = {"t": "dead", "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(OSError):
            core.send(dead) if core is not None else conn.send_bytes(encode(dead))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
