"""Async streaming over any `Engine`: a background thread steps the engine, asyncio callers
receive per-request deltas. Thread-safety comes from routing every engine call through the loop
thread's command queue, so the engine itself stays single-threaded."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from maverick_serve.engine.base import Engine
from maverick_serve.engine.native.streams import StreamTable, next_delta
from maverick_serve.engine.types import EngineDeadError, EngineRequest, EngineStats, RequestOutput

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
        self._streams = StreamTable()
        self._idle_wait_s = idle_wait_s
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

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
                    self._streams.deliver([(out.request_id, out) for out in self.engine.step()])
                self._maybe_report_stats()
        except BaseException as exc:  # surface the crash to every waiting caller
            self._error = exc
            dead = EngineDeadError(f"engine loop stopped: {exc!r}")
            self._streams.deliver([(rid, dead) for rid in self._streams.ids()])

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
        q = self._streams.open(request.request_id)
        finished = False
        try:
            await self._call(lambda: self.engine.add_request(request))
            while not finished:
                item, failure = await next_delta(q)
                finished = item.finished
                yield item
                if failure is not None:
                    raise failure
        finally:
            if not finished and self._error is None and not self._stopped.is_set():
                self._commands.put(lambda: self.engine.abort(request.request_id))
            self._streams.close(request.request_id)

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self.engine.abort(request_id))

    async def stats(self) -> EngineStats:
        result: EngineStats = await self._call(self.engine.stats)
        return result

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        self._thread.join(timeout=timeout_s)
