"""Async streaming over any `Engine`: a background thread steps the engine, asyncio callers
receive per-request deltas. Thread-safety comes from routing every engine call through the loop
thread's command queue, so the engine itself stays single-threaded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from maverick_serve.engine.base import Engine
from maverick_serve.engine.types import (
    EngineDeadError,
    EngineRequest,
    EngineStats,
    RequestOutput,
    merge_outputs,
)

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        idle_wait_s: float = 0.05,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_interval_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self._on_stats = on_stats
        self._stats_interval_s = stats_interval_s
        self._last_stats = 0.0
        self._commands: queue.Queue[Callable[[], Any]] = queue.Queue()
        self._streams: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]
        ] = {}
        self._lock = threading.Lock()
        self._idle_wait_s = idle_wait_s
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """(request id, output or error) pairs reach each caller loop in one callback: one wake-up
        per step instead of one per sequence. Each wake-up is a socket write that releases the
        GIL, and the woken caller loop takes it, so the engine loop may wait to win it back."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        with self._lock:
            for request_id, item in items:
                target = self._streams.get(request_id)
                if target is not None:
                    per_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in per_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop closed: nobody listens
                loop.call_soon_threadsafe(_put_all, batch)

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                timeout = 0.0 if self.engine.has_unfinished_requests() else self._idle_wait_s
                try:
                    cmd = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
                    cmd()
                    while True:
                        self._commands.get_nowait()()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished_requests():
                    self._deliver([(out.request_id, out) for out in self.engine.step()])
                self._maybe_report_stats()
        except BaseException as exc:  # surface the crash to every waiting caller
            self._error = exc
            with self._lock:
                ids = list(self._streams)
            self._deliver([(rid, EngineDeadError(f"engine loop stopped: {exc!r}")) for rid in ids])

    @property
    def error(self) -> BaseException | None:
        """Why the loop stopped, or None while it runs."""
        return self._error

    def _maybe_report_stats(self) -> None:
        now = time.monotonic()
        if self._on_stats is not None and now - self._last_stats >= self._stats_interval_s:
            self._last_stats = now
            try:
                self._on_stats(self.engine.stats())
            except Exception:  # metrics must never take the engine down
                logger.exception("stats callback failed")

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._error is not None or self._stopped.is_set():
            raise EngineDeadError(f"engine loop stopped: {self._error!r}")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(fut.set_exception, exc)
            else:
                loop.call_soon_threadsafe(fut.set_result, result)

        self._commands.put(run)
        return await fut

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream deltas until the finished one. Cancelling the iterator aborts the request."""
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            self._streams[request.request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            await self._call(lambda: self.engine.add_request(request))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                # Deltas that piled up while this caller was busy leave as one: fewer messages
                # across Ray and HTTP under load, and nothing waits that was already here.
                failure: BaseException | None = None
                while not item.finished and not q.empty():
                    later = q.get_nowait()
                    if isinstance(later, BaseException):
                        failure = later
                        break
                    item = merge_outputs(item, later)
                yield item
                if item.finished:
                    finished = True
                    return
                if failure is not None:
                    raise failure
        finally:
            if not finished and self._error is None and not self._stopped.is_set():
                self._commands.put(lambda: self.engine.abort(request.request_id))
            with self._lock:
                self._streams.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self.engine.abort(request_id))

    async def stats(self) -> EngineStats:
        result: EngineStats = await self._call(self.engine.stats)
        return result

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        self._thread.join(timeout=timeout_s)


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)
