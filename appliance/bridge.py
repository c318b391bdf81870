"""The one bridge between threads and async code.

``LoopInbox`` carries items put from any thread to the event loop that made it: the engine's
decode thread streams tokens through one. ``ThreadCall`` runs ``work(report, cancel)`` on a worker
thread; the event loop receives its reports as an async iterator, then its result or its
exception. ``cancel`` is a ``threading.Event`` the work may watch: ``ThreadCall.cancel()`` sets it,
which is how an async caller that gives up (a client gone) stops the work. ``settled`` awaits a
``concurrent.futures.Future`` without a thread and without polling.

Imports: the standard library only, so that every layer (web, provision, engine) may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["LoopInbox", "ThreadCall", "settled"]

P = TypeVar("P")
R = TypeVar("R")
T = TypeVar("T")


class LoopInbox(Generic[T]):
    """Items put from any thread, received in order by the event loop that made the inbox.
    Create it inside a running event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> bool:
        """Hand ``item`` to the loop, from any thread; False when the loop is gone (nobody listens)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            return False
        return True

    async def get(self) -> T:
        return await self._queue.get()


@dataclass(frozen=True)
class _Returned(Generic[R]):
    value: R


@dataclass(frozen=True)
class _Raised:
    exc: BaseException


class ThreadCall(Generic[P, R]):
    """A blocking call on a worker thread: ``async for report in call`` yields its reports
    until it ends; ``await call.result()`` then returns its value or raises its exception.
    Create it inside a running event loop."""

    def __init__(self, work: Callable[[Callable[[P], None], threading.Event], R]) -> None:
        loop = asyncio.get_running_loop()
        self.cancelled = threading.Event()
        self._items: LoopInbox[P | _Returned[R] | _Raised] = LoopInbox()
        self._peeked: list[P] = []
        self._outcome: _Returned[R] | _Raised | None = None

        def put(item: P | _Returned[R] | _Raised) -> None:
            self._items.put(item)  # False only once the event loop is gone: nobody listens then

        def run() -> None:
            try:
                put(_Returned(work(put, self.cancelled)))
            except BaseException as exc:  # handed to the awaiting side, which raises it
                put(_Raised(exc))

        # The executor keeps the thread's future; the queue carries the outcome.
        self._thread = loop.run_in_executor(None, run)

    def cancel(self) -> None:
        """Ask the work to stop (it sees ``cancel`` set); its outcome still arrives."""
        self.cancelled.set()

    async def _next(self) -> P | None:
        """The next report, or None once the call has ended."""
        if self._peeked:
            return self._peeked.pop()
        if self._outcome is not None:
            return None
        item = await self._items.get()
        if isinstance(item, _Returned | _Raised):
            self._outcome = item
            return None
        return item

    async def ready(self) -> None:
        """Wait for the first report or the end; an exception ending the call before any report
        is raised here (so a request can fail before its stream starts)."""
        report = await self._next()
        if report is not None:
            self._peeked.append(report)
        elif isinstance(self._outcome, _Raised):
            raise self._outcome.exc

    def __aiter__(self) -> ThreadCall[P, R]:
        return self

    async def __anext__(self) -> P:
        report = await self._next()
        if report is None:
            raise StopAsyncIteration
        return report

    async def result(self) -> R:
        """The call's value (after the reports not yet read), or its exception raised."""
        while await self._next() is not None:
            pass
        if isinstance(self._outcome, _Raised):
            raise self._outcome.exc
        assert self._outcome is not None
        return self._outcome.value


async def settled(future: Future[Any], *, timeout: float | None) -> bool:
    """Wait until ``future`` is done or ``timeout`` seconds pass; say whether it is done.
    Its outcome stays in ``future`` (nothing here retrieves or cancels it)."""
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def set_woken() -> None:
        if not woken.done():
            woken.set_result(None)

    def wake(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone
            loop.call_soon_threadsafe(set_woken)

    future.add_done_callback(wake)
    await asyncio.wait([woken], timeout=timeout)
    woken.cancel()
    return future.done()
