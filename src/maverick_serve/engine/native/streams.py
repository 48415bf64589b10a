"""Per-request output queues that one thread fills and asyncio callers drain: the native engine's
loop thread in-process, or the reader of the engine process's socket."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from maverick_serve.engine.types import RequestOutput, merge_outputs

Delivery = RequestOutput | BaseException


class StreamTable:
    """Request id → (caller's loop, queue). `deliver` may run on any thread; `open`, `close` and
    `next_delta` run on the caller's loop."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delivery]]] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str) -> asyncio.Queue[Delivery]:
        q: asyncio.Queue[Delivery] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def deliver(self, items: list[tuple[str, Delivery]]) -> None:
        """(request id, output or error) pairs reach each caller loop in one callback: one wake-up
        per step instead of one per sequence. Each wake-up is a socket write that releases the
        GIL, and the woken caller loop takes it, so the delivering thread may wait to win it back."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        with self._lock:
            for request_id, item in items:
                target = self._streams.get(request_id)
                if target is not None:
                    per_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in per_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop closed: nobody listens
                loop.call_soon_threadsafe(_put_all, batch)


async def next_delta(q: asyncio.Queue[Delivery]) -> tuple[RequestOutput, BaseException | None]:
    """The next delta, merged with those that piled up behind it while the caller was busy (fewer
    messages across Ray and HTTP under load, and nothing waits that was already here), and the
    error that came right after them, for the caller to raise once the delta is out."""
    item = await q.get()
    if isinstance(item, BaseException):
        raise item
    while not item.finished and not q.empty():
        later = q.get_nowait()
        if isinstance(later, BaseException):
            return item, later
        item = merge_outputs(item, later)
    return item, None


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)
