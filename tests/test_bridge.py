"""The thread → async bridge: reports as they happen, then the result or the exception."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future

import anyio
import pytest

from appliance.bridge import LoopInbox, ThreadCall, settled
from appliance.errors import SourceNotFound


def test_reports_arrive_while_the_call_runs_then_its_result() -> None:
    release = threading.Event()

    def work(report: Callable[[int], None], _: threading.Event) -> str:
        report(1)
        release.wait(timeout=30)  # the event loop sees the first report before this returns
        report(2)
        return "done"

    async def main() -> tuple[int, list[int], str]:
        call: ThreadCall[int, str] = ThreadCall(work)
        await call.ready()
        first = await anext(call)
        release.set()
        return first, [report async for report in call], await call.result()

    assert anyio.run(main) == (1, [2], "done")


def test_a_call_that_fails_before_reporting_fails_ready() -> None:
    def work(report: Callable[[int], None], _: threading.Event) -> None:
        raise SourceNotFound("/nope.gguf does not exist")

    async def main() -> None:
        await ThreadCall(work).ready()

    with pytest.raises(SourceNotFound, match="does not exist"):
        anyio.run(main)


def test_a_failure_after_reports_comes_from_result() -> None:
    def work(report: Callable[[int], None], _: threading.Event) -> None:
        report(1)
        raise SourceNotFound("gone midway")

    async def main() -> list[int]:
        call: ThreadCall[int, None] = ThreadCall(work)
        seen = [report async for report in call]
        with pytest.raises(SourceNotFound, match="gone midway"):
            await call.result()
        return seen

    assert anyio.run(main) == [1]


def test_cancel_reaches_the_work() -> None:
    def work(report: Callable[[str], None], cancel: threading.Event) -> bool:
        report("waiting")
        return cancel.wait(timeout=30)

    async def main() -> bool:
        call: ThreadCall[str, bool] = ThreadCall(work)
        await call.ready()
        call.cancel()
        return await call.result()

    assert anyio.run(main) is True


def test_settled_wakes_when_the_future_ends_and_says_when_it_has_not() -> None:
    async def main() -> tuple[bool, bool]:
        future: Future[int] = Future()
        early = await settled(future, timeout=0)
        threading.Thread(target=future.set_result, args=(7,)).start()
        return early, await settled(future, timeout=30)

    assert anyio.run(main) == (False, True)


def test_an_inbox_carries_items_from_threads_in_order() -> None:
    async def main() -> list[int]:
        inbox: LoopInbox[int] = LoopInbox()
        sender = threading.Thread(target=lambda: [inbox.put(n) for n in range(100)])
        sender.start()
        received = [await inbox.get() for _ in range(100)]
        sender.join()
        return received

    assert asyncio.run(main()) == list(range(100))


def test_an_inbox_whose_loop_is_gone_says_nobody_listens() -> None:
    async def make() -> LoopInbox[int]:
        return LoopInbox()

    inbox = asyncio.run(make())  # the loop is closed once run returns
    assert inbox.put(1) is False
