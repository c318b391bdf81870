"""The remote engine over a real work channel, with a coroutine answering as a worker would: tokens
flow back decoded, a worker's error is the same error class, a lost node ends the stream with
NotReady (never a hang), and closing the stream early cancels the work on the worker."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.cluster.channel import WorkChannel
from appliance.cluster.remote import RemoteEngine
from appliance.cluster.wire import decode_prompt, decode_spec, encode_embeddings, encode_error, encode_event
from appliance.engine.base import (
    Embeddings,
    EngineEvent,
    Finished,
    LoadSpec,
    Prompt,
    Ready,
    TextChunk,
)
from appliance.errors import (
    ApplianceError,
    EngineBusy,
    EngineFailure,
    InvalidInput,
    NotReady,
    PromptTooLong,
)

T = TypeVar("T")
NODE = "n1"
SPEC = LoadSpec(
    key="tiny:latest", digest="sha256:" + "a" * 64, path=Path("/nowhere"), size_bytes=10, context_length=64
)
PROMPT = Prompt(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
ANSWER: list[EngineEvent] = [
    Ready(reason="the model was already loaded", prompt_tokens=3, queued=1),
    TextChunk("hel"),
    TextChunk("lo"),
    Finished("stop", 3, 2),
]


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), timeout=30))


def engine(channel: WorkChannel) -> RemoteEngine:
    return RemoteEngine(NODE, "w1", channel, memory_budget=1 << 30)


async def lines(*events: dict[str, Any], pause: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """An answer's streamed body, one line per chunk; waits on ``pause`` after the first line."""
    for index, event in enumerate(events):
        yield json.dumps(event).encode() + b"\n"
        if index == 0 and pause is not None:
            await pause.wait()


async def take(channel: WorkChannel) -> dict[str, Any]:
    """The worker's long-poll: the next item for the node."""
    [item] = await channel.poll(NODE, wait=5)
    return item


async def collect(stream: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
    return [event async for event in stream]


def test_a_generation_crosses_the_channel_and_its_events_come_back_decoded() -> None:
    async def test() -> tuple[dict[str, Any], list[EngineEvent], dict[str, Any]]:
        channel = WorkChannel()
        consumer = asyncio.create_task(collect(engine(channel).generate(SPEC, PROMPT)))
        item = await take(channel)
        answer = await channel.accept(NODE, item["id"], lines(*map(encode_event, ANSWER)))
        return item, await consumer, answer

    item, events, answer = run(test)
    assert item["kind"] == "generate"
    assert decode_spec(item["spec"], SPEC.path) == SPEC  # the worker puts its own path in
    assert decode_prompt(item["prompt"]) == PROMPT
    assert events == ANSWER
    assert answer == {"state": "done"}


@pytest.mark.parametrize(
    "error",
    [PromptTooLong("the prompt has 900 tokens; the context holds 64"), EngineBusy("12 requests wait")],
    ids=lambda error: error.code,
)
def test_a_workers_error_before_ready_raises_the_same_class(error: ApplianceError) -> None:
    async def test() -> None:
        channel = WorkChannel()
        consumer = asyncio.create_task(collect(engine(channel).generate(SPEC, PROMPT)))
        item = await take(channel)
        failed = encode_event(Finished("error", 0, 0, error))
        await channel.accept(NODE, item["id"], lines(failed))
        await consumer

    with pytest.raises(type(error)) as caught:
        run(test)
    assert type(caught.value) is type(error)
    assert (caught.value.message, caught.value.hint) == (error.message, error.hint)


def test_a_workers_error_mid_answer_finishes_the_stream_carrying_it() -> None:
    """As the local engine does: the inference service raises it to the client."""

    async def test() -> list[EngineEvent]:
        channel = WorkChannel()
        consumer = asyncio.create_task(collect(engine(channel).generate(SPEC, PROMPT)))
        item = await take(channel)
        failed = Finished("error", 3, 1, EngineFailure("model tiny:latest was unloaded"))
        await channel.accept(NODE, item["id"], lines(*map(encode_event, [*ANSWER[:2], failed])))
        return await consumer

    *_, last = run(test)
    assert isinstance(last, Finished)
    assert isinstance(last.error, EngineFailure)
    assert last.error.message == "model tiny:latest was unloaded"


def test_a_node_lost_mid_answer_ends_the_stream_with_not_ready() -> None:
    async def test() -> list[EngineEvent]:
        channel = WorkChannel()
        received: list[EngineEvent] = []

        async def consume() -> None:
            async for event in engine(channel).generate(SPEC, PROMPT):
                received.append(event)

        consumer = asyncio.create_task(consume())
        item = await take(channel)
        hold = asyncio.Event()  # the worker never sends another line
        answering = asyncio.create_task(
            channel.accept(NODE, item["id"], lines(encode_event(ANSWER[0]), pause=hold))
        )
        while not received:
            await asyncio.sleep(0.01)
        channel.node_lost(NODE, "node w1 missed its heartbeats")
        with pytest.raises(NotReady, match="node w1 missed its heartbeats"):
            await consumer
        hold.set()
        assert await answering == {"state": "failed"}
        return received

    assert run(test) == ANSWER[:1]


def test_an_answer_that_breaks_off_ends_the_stream_with_not_ready() -> None:
    async def test() -> None:
        channel = WorkChannel()
        consumer = asyncio.create_task(collect(engine(channel).generate(SPEC, PROMPT)))
        item = await take(channel)
        with pytest.raises(InvalidInput, match="ended without a finished line"):  # the worker is told
            await channel.accept(NODE, item["id"], lines(*map(encode_event, ANSWER[:2])))
        with pytest.raises(NotReady, match="answer ended before it finished"):
            await consumer

    run(test)


def test_work_no_worker_takes_ends_with_not_ready_within_its_lease() -> None:
    async def test() -> None:
        with pytest.raises(NotReady, match="node w1 did not take it within its lease"):
            await collect(engine(WorkChannel(lease=0.2)).generate(SPEC, PROMPT))

    run(test)


def test_closing_the_stream_early_cancels_the_work_on_the_worker() -> None:
    async def test() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        channel = WorkChannel()
        stream = engine(channel).generate(SPEC, PROMPT)
        first = asyncio.create_task(anext(stream))
        item = await take(channel)
        hold = asyncio.Event()
        answering = asyncio.create_task(
            channel.accept(NODE, item["id"], lines(*map(encode_event, ANSWER), pause=hold))
        )
        assert await first == ANSWER[0]
        await stream.aclose()  # the client went away
        cancel = await take(channel)
        hold.set()
        return item, cancel, await answering

    item, cancel, answer = run(test)
    assert (cancel["kind"], cancel["work"]) == ("cancel", item["id"])
    assert answer == {"state": "cancelled"}


def test_an_unreadable_line_is_the_workers_fault_and_cancels_the_work() -> None:
    async def test() -> tuple[str, dict[str, Any]]:
        channel = WorkChannel()
        consumer = asyncio.create_task(collect(engine(channel).generate(SPEC, PROMPT)))
        item = await take(channel)
        hold = asyncio.Event()
        answering = asyncio.create_task(
            channel.accept(NODE, item["id"], lines({"type": "sparkle"}, encode_event(ANSWER[-1]), pause=hold))
        )
        with pytest.raises(EngineFailure) as caught:
            await consumer
        cancel = await take(channel)
        hold.set()
        await answering
        return caught.value.message, cancel

    message, cancel = run(test)
    assert message.startswith("node w1 sent an unreadable answer: ")
    assert cancel["kind"] == "cancel"


def test_embeddings_cross_the_channel() -> None:
    result = Embeddings(vectors=[[0.5, -0.25]], tokens=2, reason="the model was already loaded")

    async def test() -> tuple[dict[str, Any], Embeddings]:
        channel = WorkChannel()
        consumer = asyncio.create_task(engine(channel).embed(SPEC, ["hi"], keep_alive=60.0, truncate=True))
        item = await take(channel)
        await channel.accept(NODE, item["id"], lines(encode_embeddings(result)))
        return item, await consumer

    item, got = run(test)
    assert (item["kind"], item["texts"], item["keep_alive"], item["truncate"]) == (
        "embed",
        ["hi"],
        60.0,
        True,
    )
    assert got == result


def test_an_embedding_error_is_the_same_class() -> None:
    async def test() -> Embeddings:
        channel = WorkChannel()
        consumer = asyncio.create_task(engine(channel).embed(SPEC, ["hi" * 500], keep_alive=None))
        item = await take(channel)
        error = encode_error(PromptTooLong("an input has 1000 tokens; this model's context holds 64"))
        await channel.accept(NODE, item["id"], lines({"type": "finished", "reason": "error", "error": error}))
        return await consumer

    with pytest.raises(PromptTooLong, match="an input has 1000 tokens"):
        run(test)


def test_a_node_lost_during_an_embedding_is_not_ready() -> None:
    async def test() -> None:
        channel = WorkChannel()
        consumer = asyncio.create_task(engine(channel).embed(SPEC, ["hi"], keep_alive=None))
        await take(channel)
        channel.node_lost(NODE, "node w1 was removed")
        await consumer

    with pytest.raises(NotReady, match="node w1 was removed"):
        run(test)


def test_a_cancelled_embedding_cancels_the_work() -> None:
    async def test() -> dict[str, Any]:
        channel = WorkChannel()
        consumer = asyncio.create_task(engine(channel).embed(SPEC, ["hi"], keep_alive=None))
        await take(channel)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        return await take(channel)

    assert run(test)["kind"] == "cancel"


def test_loading_is_the_nodes_configuration_not_a_request() -> None:
    remote = engine(WorkChannel())
    with pytest.raises(NotReady, match="node w1 loads the models its configuration lists") as caught:
        remote.load(SPEC, keep_alive=None)
    assert f"/api/v1/nodes/{NODE}/models" in caught.value.hint
    assert remote.loaded() == []
    assert remote.unload(SPEC.key) is False
    assert (remote.name, remote.node, remote.memory_budget, remote.gpu_offload) == (
        "worker:llama.cpp",
        "w1",
        1 << 30,
        False,
    )


# -- from another event loop (the task queue's): relayed through the channel's own loop ---------------


@pytest.fixture
def channel_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coroutine`` on the channel's loop; await its result from the asking loop."""
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


def test_a_generation_asked_from_another_loop_is_relayed(channel_loop: asyncio.AbstractEventLoop) -> None:
    async def worker(channel: WorkChannel) -> None:
        item = await take(channel)
        await channel.accept(NODE, item["id"], lines(*map(encode_event, ANSWER)))

    async def test() -> list[EngineEvent]:
        channel = WorkChannel()
        remote = RemoteEngine(NODE, "w1", channel, loop=channel_loop)
        answering = on(channel_loop, worker(channel))
        events = await collect(remote.generate(SPEC, PROMPT))
        await answering
        return events

    assert run(test) == ANSWER


def test_closing_a_relayed_stream_early_cancels_the_work(channel_loop: asyncio.AbstractEventLoop) -> None:
    async def test() -> dict[str, Any]:
        channel = WorkChannel()
        remote = RemoteEngine(NODE, "w1", channel, loop=channel_loop)
        stream = remote.generate(SPEC, PROMPT)
        first = asyncio.create_task(anext(stream))
        item = await on(channel_loop, take(channel))
        hold = asyncio.Event()  # waited on by the channel's loop: set from there
        body = lines(*map(encode_event, ANSWER), pause=hold)
        answering = on(channel_loop, channel.accept(NODE, item["id"], body))
        assert await first == ANSWER[0]
        await stream.aclose()
        cancel = await on(channel_loop, take(channel))
        assert cancel["work"] == item["id"]
        channel_loop.call_soon_threadsafe(hold.set)
        assert await answering == {"state": "cancelled"}
        return cancel

    assert run(test)["kind"] == "cancel"


def test_a_node_lost_under_a_relayed_stream_is_not_ready(channel_loop: asyncio.AbstractEventLoop) -> None:
    async def lose(channel: WorkChannel) -> None:
        await take(channel)
        channel.node_lost(NODE, "node w1 missed its heartbeats")

    async def test() -> None:
        channel = WorkChannel()
        remote = RemoteEngine(NODE, "w1", channel, loop=channel_loop)
        losing = on(channel_loop, lose(channel))
        with pytest.raises(NotReady, match="node w1 missed its heartbeats"):
            await collect(remote.generate(SPEC, PROMPT))
        await losing

    run(test)
