"""The work channel on its own event loop: hand-out, answers line by line, leases, lost nodes,
cancels and idempotent completion. (The HTTP side is in test_web.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from appliance.cluster.channel import WorkChannel
from appliance.errors import InvalidInput, LeaseLost, NotReady

T = TypeVar("T")
FINISHED = {"type": "finished", "reason": "stop"}


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), timeout=30))


async def body(*lines: dict[str, Any], pause: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """An answer's body: each line as its own chunk; waits on ``pause`` after the first one."""
    for index, line in enumerate(lines):
        yield json.dumps(line).encode() + b"\n"
        if index == 0 and pause is not None:
            await pause.wait()


async def drain(events: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event async for event in events]


def test_a_poll_returns_as_soon_as_work_is_submitted_and_the_answer_reaches_the_waiter() -> None:
    async def test() -> None:
        channel = WorkChannel()
        poll = asyncio.create_task(channel.poll("n1", wait=20))
        await asyncio.sleep(0.05)
        assert not poll.done()
        work = channel.submit("n1", {"kind": "generate", "prompt": {}})
        items = await asyncio.wait_for(poll, timeout=1)
        assert items == [{"kind": "generate", "prompt": {}, "id": work.id, "lease_seconds": 30.0}]
        assert channel.load("n1") == 1
        answer = await channel.accept("n1", work.id, body({"type": "text", "text": "hi"}, FINISHED))
        assert answer == {"state": "done"}
        assert await drain(work.events()) == [{"type": "text", "text": "hi"}, FINISHED]
        assert channel.load("n1") == 0

    run(test)


def test_an_empty_poll_ends_after_its_wait() -> None:
    async def test() -> list[dict[str, Any]]:
        return await WorkChannel().poll("n1", wait=0.1)

    assert run(test) == []


def test_each_line_reaches_the_waiter_before_the_answer_ends() -> None:
    async def test() -> None:
        channel = WorkChannel()
        work = channel.submit("n1", {"kind": "generate"})
        await channel.poll("n1", wait=1)
        pause = asyncio.Event()
        answering = asyncio.create_task(
            channel.accept("n1", work.id, body({"type": "text", "text": "a"}, FINISHED, pause=pause))
        )
        events = work.events()
        assert await asyncio.wait_for(anext(events), timeout=1) == {"type": "text", "text": "a"}
        assert not answering.done()  # the body has not ended
        pause.set()
        assert await answering == {"state": "done"}
        assert await drain(events) == [FINISHED]

    run(test)


def test_a_second_completion_is_told_it_is_a_duplicate_and_another_node_gets_409() -> None:
    async def test() -> None:
        channel = WorkChannel()
        work = channel.submit("n1", {"kind": "embed"})
        await channel.poll("n1", wait=1)
        with pytest.raises(LeaseLost, match="not leased to this node"):
            await channel.accept("n2", work.id, body(FINISHED))
        with pytest.raises(LeaseLost):
            await channel.accept("n1", "w-unknown", body(FINISHED))
        done = {"type": "embeddings", "vectors": [[1.0]], "tokens": 1, "reason": "stop"}
        assert await channel.accept("n1", work.id, body(done)) == {"state": "done"}
        assert await channel.accept("n1", work.id, body(done)) == {"state": "done", "duplicate": True}
        with pytest.raises(LeaseLost):
            await channel.accept("n2", work.id, body(done))
        assert await drain(work.events()) == [done]

    run(test)


@pytest.mark.parametrize("taken", [False, True], ids=["not taken", "taken, not started"])
def test_work_not_started_within_its_lease_fails_its_waiter_naming_the_node(taken: bool) -> None:
    async def test() -> None:
        channel = WorkChannel(lease=0.2)
        work = channel.submit("n1", {"kind": "generate"})
        if taken:
            assert len(await channel.poll("n1", wait=1)) == 1
        what = "did not start it" if taken else "did not take it"
        with pytest.raises(NotReady, match=rf"node n1 {what} within its lease of 0\.2 s"):
            await drain(work.events())
        assert channel.load("n1") == 0
        assert await channel.poll("n1", wait=0.05) == []  # no longer handed out
        with pytest.raises(LeaseLost):  # a late answer is refused
            await channel.accept("n1", work.id, body(FINISHED))

    run(test)


def test_a_lost_node_fails_its_queued_leased_and_running_work() -> None:
    async def test() -> None:
        channel = WorkChannel()
        running = channel.submit("n1", {"kind": "generate"})
        await channel.poll("n1", wait=1)
        pause = asyncio.Event()
        answering = asyncio.create_task(
            channel.accept("n1", running.id, body({"type": "text", "text": "a"}, FINISHED, pause=pause))
        )
        leased = channel.submit("n1", {"kind": "generate"})
        await channel.poll("n1", wait=1)
        queued = channel.submit("n1", {"kind": "generate"})
        other = channel.submit("n2", {"kind": "generate"})
        events = running.events()
        assert await anext(events) == {"type": "text", "text": "a"}
        channel.node_lost("n1", "node w1 missed its heartbeats")
        for work_events in (events, leased.events(), queued.events()):
            with pytest.raises(NotReady, match="node w1 missed its heartbeats"):
                await drain(work_events)
        assert channel.load("n1") == 0
        assert channel.load("n2") == 1
        assert other.state == "queued"
        pause.set()
        assert await answering == {"state": "failed"}  # the rest of that answer goes nowhere
        assert await channel.poll("n1", wait=0.05) == []

    run(test)


def test_a_cancel_ends_the_stream_tells_the_node_and_answers_its_next_line() -> None:
    async def test() -> None:
        channel = WorkChannel()
        work = channel.submit("n1", {"kind": "generate"})
        await channel.poll("n1", wait=1)
        pause = asyncio.Event()
        answering = asyncio.create_task(
            channel.accept("n1", work.id, body({"type": "text", "text": "a"}, FINISHED, pause=pause))
        )
        events = work.events()
        assert await anext(events) == {"type": "text", "text": "a"}
        channel.cancel(work.id)
        assert await drain(events) == []
        (told,) = await channel.poll("n1", wait=1)
        assert (told["kind"], told["work"]) == ("cancel", work.id)
        pause.set()
        assert await answering == {"state": "cancelled"}
        assert await channel.accept("n1", work.id, body(FINISHED)) == {"state": "cancelled"}

    run(test)


def test_cancelling_queued_work_just_takes_it_back() -> None:
    async def test() -> None:
        channel = WorkChannel()
        work = channel.submit("n1", {"kind": "generate"})
        channel.cancel(work.id)
        assert await drain(work.events()) == []
        assert await channel.poll("n1", wait=0.05) == []

    run(test)


def test_an_answer_that_ends_early_or_is_not_json_fails_the_waiter() -> None:
    async def test() -> None:
        channel = WorkChannel()
        short = channel.submit("n1", {"kind": "generate"})
        garbled = channel.submit("n1", {"kind": "generate"})
        await channel.poll("n1", wait=1)
        with pytest.raises(InvalidInput, match="without a finished line"):
            await channel.accept("n1", short.id, body({"type": "text", "text": "a"}))
        with pytest.raises(NotReady, match="ended before it finished"):
            await drain(short.events())

        async def not_json() -> AsyncIterator[bytes]:
            yield b"{nope\n"

        with pytest.raises(InvalidInput, match="not JSON"):
            await channel.accept("n1", garbled.id, not_json())
        with pytest.raises(NotReady, match="broke off"):
            await drain(garbled.events())

    run(test)


def test_a_config_wake_up_is_queued_once_per_version() -> None:
    async def test() -> None:
        channel = WorkChannel()
        channel.announce_config("n1", "V1")
        channel.announce_config("n1", "V1")
        items = await channel.poll("n1", wait=1)
        assert [item["kind"] for item in items] == ["config"]
        channel.announce_config("n1", "V1")
        assert await channel.poll("n1", wait=0.05) == []
        channel.announce_config("n1", "V2")
        assert [item["kind"] for item in await channel.poll("n1", wait=1)] == ["config"]

    run(test)


def test_lines_split_across_chunks_are_put_together() -> None:
    async def test() -> None:
        channel = WorkChannel()
        work = channel.submit("n1", {"kind": "generate"})
        await channel.poll("n1", wait=1)
        text = (json.dumps({"type": "text", "text": "ab"}) + "\n\n" + json.dumps(FINISHED)).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(text), 5):
                yield text[start : start + 5]

        assert await channel.accept("n1", work.id, chunks()) == {"state": "done"}
        assert await drain(work.events()) == [{"type": "text", "text": "ab"}, FINISHED]

    run(test)


def test_a_line_past_the_limit_fails_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.cluster.channel.MAX_LINE_BYTES", 100)

    async def test() -> None:
        channel = WorkChannel()
        work = channel.submit("n1", {"kind": "embed"})
        await channel.poll("n1", wait=1)

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 60

        with pytest.raises(InvalidInput, match="longer than 100 bytes"):
            await channel.accept("n1", work.id, endless())
        with pytest.raises(NotReady, match="broke off"):
            await drain(work.events())

    run(test)
