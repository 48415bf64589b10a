"""The replica's side of an engine process (`engine.separate_process`): a `ServingEngine` whose
native engine steps in a child process (`core`), so that the replica's event loop, Ray's threads
and the HTTP path never hold the GIL its engine loop needs (vLLM splits AsyncLLM from EngineCore
for the same reason).

Requests are checked here before they cross (the same `check_request` as in-process: bad input
is a 4xx without a round trip); a reader thread turns the child's frames into stream deltas, the
latest load report, cache events and call replies. The child dying fails every stream and call
with `EngineDeadError`, and `error` says why, which Serve's health check reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.base import ServingEngine
from maverick_serve.engine.cache_view import CacheView
from maverick_serve.engine.native.malloc_env import engine_process_environment
from maverick_serve.engine.native.streams import Delivery, StreamTable, next_delta
from maverick_serve.engine.request_checks import check_request
from maverick_serve.engine.types import EngineDeadError, EngineRequest, EngineStats, RequestOutput
from maverick_serve.serving.engine_process.wire import (
    decode,
    encode,
    error_from_wire,
    output_from_wire,
    request_to_wire,
)

logger = logging.getLogger(__name__)
CORE_MODULE = "maverick_serve.serving.engine_process.core"
CALL_TIMEOUT_S = 10.0
# Image frames this large are written from a worker thread: the child reads between steps, and the
# replica's event loop must not wait on it meanwhile.
BIG_SEND_BYTES = 1 << 20


class EngineProcessClient(ServingEngine):
    def __init__(
        self,
        model_dir: Path,
        cluster: ClusterConfig,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_interval_s: float = 1.0,
    ) -> None:
        self.spec = ModelSpec.from_pretrained_dir(model_dir)
        self.limits = cluster.engine
        self._on_stats = on_stats
        self._streams = StreamTable()
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._send_lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopping = False
        self._load: dict[str, float] = {}
        self._view = ProcessCacheView(self)
        ours, theirs = socket.socketpair()
        keep_freed = isinstance(cluster.engine, NativeEngineConfig) and cluster.engine.keep_freed_memory
        self._proc = subprocess.Popen(
            [sys.executable, "-m", CORE_MODULE, "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=engine_process_environment(keep_freed),
            start_new_session=True,  # a Ctrl-C meant for `up` reaches the child only through us
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        init = {
            "t": "init",
            "config": cluster.model_dump(mode="json"),
            "model_dir": str(model_dir),
            "stats_interval_s": stats_interval_s,
        }
        try:
            self._conn.send_bytes(encode(init))
            ready = self._wait_ready()
        except BaseException:
            self._kill()
            raise
        self.max_model_len = int(ready["max_model_len"])
        self._view.has_tier = bool(ready["has_tier"])
        self._view.tier_shared = bool(ready["tier_shared"])
        self._load = ready["load"]
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()
        logger.info("engine process %d ready", self._proc.pid)

    def _wait_ready(self) -> dict[str, Any]:
        """The child's ready frame; it may take minutes to load a checkpoint, so wait as long as it
        lives."""
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise RuntimeError(f"engine process exited with code {self._proc.returncode} while loading")
        try:
            message = decode(self._conn.recv_bytes())
        except EOFError:
            code = self._proc.wait(timeout=10)
            raise RuntimeError(f"engine process exited with code {code} while loading") from None
        if message["t"] == "dead":
            raise RuntimeError(f"engine process failed to load: {message['error']}")
        if message["t"] != "ready":
            raise RuntimeError(f"engine process sent {message['t']!r} before ready")
        return message

    # ---- ServingEngine --------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream deltas until the finished one. Closing the iterator aborts the request."""
        self._check_alive()
        check_request(request, self.spec, self.limits, self.max_model_len)
        q = self._streams.open(request.request_id)
        finished = False
        try:
            body, frames = request_to_wire(request)
            message = {"t": "add", "request": body, "frames": len(frames)}
            if sum(len(f) for f in frames) >= BIG_SEND_BYTES:
                await asyncio.to_thread(self._send, message, frames)
            else:
                self._send(message, frames)
            while not finished:
                item, failure = await next_delta(q)
                finished = item.finished
                yield item
                if failure is not None:
                    raise failure
        finally:
            if not finished and self._error is None:
                with contextlib.suppress(OSError, EngineDeadError):
                    self._send({"t": "abort", "id": request.request_id})
            self._streams.close(request.request_id)

    async def stats(self) -> EngineStats:
        value = await asyncio.wrap_future(self.call("stats"))
        return EngineStats.model_validate(value)

    def load_report(self) -> dict[str, float]:
        return dict(self._load)  # replaced whole by the reader: one read is one report

    @property
    def error(self) -> BaseException | None:
        return self._error

    def cache_view(self) -> CacheView:
        return self._view

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError, EngineDeadError):
            self._send({"t": "stop"})
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("engine process %d did not stop in %g s; killing it", self._proc.pid, timeout_s)
            self._kill()
        self._conn.close()

    # ---- the socket -----------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(str(self._error))

    def _send(self, message: dict[str, Any], frames: list[bytes] | None = None) -> None:
        self._check_alive()
        try:
            with self._send_lock:
                self._conn.send_bytes(encode(message))
                for frame in frames or []:
                    self._conn.send_bytes(frame)
        except OSError as exc:  # the child is gone; the reader is about to say why
            raise EngineDeadError(f"engine process socket closed: {exc!r}") from exc

    def call(self, fn: str, **args: Any) -> concurrent.futures.Future[Any]:
        """Run `fn` in the engine process between two steps; the future gets its value."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self._send({"t": "call", "id": call_id, "fn": fn, "args": args})
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return future

    def _read(self) -> None:
        reason = "the engine process closed its socket"
        try:
            while True:
                message = decode(self._conn.recv_bytes())
                kind = message["t"]
                if kind == "out":
                    self._take_outputs(message)
                elif kind == "reply":
                    future = self._calls.pop(int(message["id"]), None)
                    if future is not None:
                        if "error" in message:
                            future.set_exception(error_from_wire(message["error"]))
                        else:
                            future.set_result(message.get("value"))
                elif kind == "stats":
                    if self._on_stats is not None:
                        try:
                            self._on_stats(EngineStats.model_validate(message["stats"]))
                        except Exception:  # metrics must never take the engine down
                            logger.exception("stats callback failed")
                elif kind == "dead":
                    reason = f"engine loop stopped: {message['error']}"
        except (EOFError, OSError):
            pass
        except Exception as exc:  # a frame we cannot read: the two sides disagree, stop here
            logger.exception("engine process sent an unreadable frame")
            reason = f"unreadable frame from the engine process: {exc!r}"
        code = self._proc.poll()
        if code is None and not self._stopping:
            self._kill()  # a child that talks nonsense is not serving anyone
            code = self._proc.poll()
        self._error = EngineDeadError(f"{reason} (exit code {code})")
        if not self._stopping:
            logger.error("engine process %d is down: %s", self._proc.pid, self._error)
        self._streams.deliver([(rid, self._error) for rid in self._streams.ids()])
        for call_id in list(self._calls):
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(self._error)

    def _take_outputs(self, message: dict[str, Any]) -> None:
        # The load first: the router reads it off a stream's first delta, and it must count that
        # stream's request.
        self._load = message["load"]
        if "events" in message:
            self._view.take_events(message["events"])
        if "tier_events" in message:
            self._view.take_tier_events(message["tier_events"])
        items: list[tuple[str, Delivery]] = [
            (wire["id"], output_from_wire(wire)) for wire in message["outputs"]
        ]
        items += [(e["id"], error_from_wire(e["error"])) for e in message.get("errors", [])]
        self._streams.deliver(items)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


class ProcessCacheView(CacheView):
    """The engine process's caches, mirrored from the events it sends with its frames."""

    def __init__(self, client: EngineProcessClient) -> None:
        self.client = client
        self.has_tier = False
        self.tier_shared = True
        self._events: deque[tuple[bool, bytes]] | None = None
        self._tier_events: deque[bytes] | None = None

    def cache_events(self, maxlen: int) -> deque[tuple[bool, bytes]]:
        if self._events is None:
            self._events = deque(maxlen=maxlen)
            self.client.call("cache_events", maxlen=maxlen).result(CALL_TIMEOUT_S)
        return self._events

    def tier_events(self, maxlen: int) -> deque[bytes] | None:
        if not self.has_tier:
            return None
        if self._tier_events is None:
            self._tier_events = deque(maxlen=maxlen)
            self.client.call("tier_events", maxlen=maxlen).result(CALL_TIMEOUT_S)
        return self._tier_events

    def cached_blocks(self) -> list[bytes]:
        hashes = self.client.call("cached_blocks").result(CALL_TIMEOUT_S)
        return [bytes.fromhex(h) for h in hashes]

    def flush_tier(self, timeout_s: float) -> None:
        if self.has_tier:
            self.client.call("flush_tier", timeout_s=timeout_s).result(timeout_s + CALL_TIMEOUT_S)

    def take_events(self, events: list[tuple[int, str]]) -> None:
        if self._events is not None:
            self._events.extend((bool(stored), bytes.fromhex(h)) for stored, h in events)

    def take_tier_events(self, hashes: list[str]) -> None:
        if self._tier_events is not None:
            self._tier_events.extend(bytes.fromhex(h) for h in hashes)
