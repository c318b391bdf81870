"""A generation as both compatible APIs serve it: opened up to its first text before any byte is sent.

OpenAI's ``n`` > 1 asks for several answers to one prompt: ``open_choices`` opens one generation
per choice at once (the engine decodes them as parallel sequences) and ``interleave`` reads them
in turn, so a stream carries every choice's pieces as they come.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import anyio
from litestar import Request
from litestar.response import Stream

from appliance.audit import Context
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, TokenLogprob, ToolCall
from appliance.engine.service import GenerationOptions, InferenceService, Started

__all__ = [
    "Event",
    "Events",
    "Generation",
    "close_all",
    "event_stream",
    "interleave",
    "named_event",
    "named_provider",
    "open_chat",
    "open_choices",
    "prompt_tokens",
    "route_headers",
]

Event = TextChunk | ReasoningChunk | ToolCall | Finished
Events = AsyncIterator[Started | Event]


class Generation:
    """One request's events, opened up to its first text so that a bad model, a prompt that is
    too long or a full queue fails as an HTTP error (a 503 with Retry-After that clients retry),
    not as a line in a stream whose 200 is already sent.

    Ollama's durations, in nanoseconds: load until the engine took the request, prompt eval
    until the first text, eval from there to the end.
    """

    def __init__(self, events: Events) -> None:
        self.events = events
        self.began = self.opened = time.perf_counter_ns()
        self.first_token: int | None = None
        self.started: Started | None = None
        self._peeked: Event | None = None
        self.reasoning = ""  # what collect() gathered of a reasoning block
        self.logprobs: list[TokenLogprob] = []  # what collect() read, when they were asked for

    @property
    def model(self) -> str:
        return self.started.model if self.started is not None else ""

    async def open(self) -> Started:
        try:
            started = await anext(self.events)
            assert isinstance(started, Started)
            self.started = started
            self.opened = time.perf_counter_ns()
            self._peeked = await self._fetch()
        except BaseException:
            await self.close()
            raise
        return started

    async def _fetch(self) -> Event:
        event = await anext(self.events)
        assert not isinstance(event, Started)
        if isinstance(event, TextChunk | ReasoningChunk) and self.first_token is None:
            self.first_token = time.perf_counter_ns()
        return event

    async def next(self) -> Event:
        if self._peeked is None:
            return await self._fetch()
        event, self._peeked = self._peeked, None
        return event

    async def close(self) -> None:
        """Close the inner stream now, which frees its sequence, even while being cancelled."""
        if isinstance(self.events, AsyncGenerator):
            with anyio.CancelScope(shield=True):
                await self.events.aclose()

    def counters(self, finished: Finished) -> dict[str, Any]:
        now = time.perf_counter_ns()
        first = self.first_token or now
        return {
            "done_reason": "length" if finished.reason == "length" else "stop",
            "total_duration": now - self.began,
            "load_duration": self.opened - self.began,
            "prompt_eval_count": finished.prompt_tokens,
            "prompt_eval_duration": first - self.opened,
            "eval_count": finished.completion_tokens,
            "eval_duration": now - first,
        }

    async def collect(self) -> tuple[str, list[ToolCall], Finished]:
        """The whole text, the tool calls and how it finished (a non-streamed answer); closes the
        stream. The reasoning, if the model thought, is left in ``reasoning``."""
        parts: list[str] = []
        calls: list[ToolCall] = []
        reasoning: list[str] = []
        try:
            while not isinstance(event := await self.next(), Finished):
                if isinstance(event, ToolCall):
                    calls.append(event)
                elif isinstance(event, ReasoningChunk):
                    reasoning.append(event.text)
                else:
                    parts.append(event.text)
                    self.logprobs.extend(event.logprobs)
        finally:
            await self.close()
        self.reasoning = "".join(reasoning)
        return "".join(parts), calls, event


PROVIDER_HEADER = "X-Appliance-Provider"


def named_provider(request: Request[Any, Any, Any]) -> str | None:
    """The external provider a request names in its X-Appliance-Provider header, if it does
    (REQ-MODELS-0116): routing sends it there when policy allows, and refuses it otherwise."""
    return request.headers.get(PROVIDER_HEADER) or None


def prompt_tokens(started: Started, finished: Finished) -> int:
    """The prompt's tokens: the local engine counts them before the first token, an external
    provider only in its last event."""
    return max(started.prompt_tokens, finished.prompt_tokens)


def route_headers(started: Started, *, stream: bool = False) -> dict[str, str]:
    """Which engine served the answer and why (REQ-MODELS-0118); a stream is never cached."""
    headers = {"X-Appliance-Engine": started.route.engine, "X-Appliance-Route-Reason": started.route.reason}
    return {"Cache-Control": "no-cache", **headers} if stream else headers


def event_stream(lines: AsyncIterator[bytes], started: Started) -> Stream:
    """A server-sent event stream of an answer, with its route's headers."""
    return Stream(lines, media_type="text/event-stream", headers=route_headers(started, stream=True))


def named_event(name: str, payload: dict[str, Any]) -> bytes:
    """One server-sent event with its name, as the Responses and Anthropic Messages streams send them."""
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def open_chat(
    inference: InferenceService,
    model: str,
    messages: list[dict[str, Any]],
    options: GenerationOptions,
    *,
    endpoint: str,
    context: Context,
    provider: str | None = None,
) -> tuple[Generation, Started]:
    """One chat turn's generation, opened: the Responses and Messages APIs answer with a single one."""
    generation = Generation(
        inference.chat(model, messages, options, endpoint=endpoint, context=context, provider=provider)
    )
    return generation, await generation.open()


async def open_choices(streams: Sequence[Events]) -> list[Generation]:
    """A generation per stream, all opened together; when one fails, all are closed and its error
    raised (the first one's, when several fail)."""
    generations = [Generation(events) for events in streams]
    if len(generations) == 1:
        await generations[0].open()
        return generations
    errors: list[BaseException] = []

    async def open_one(generation: Generation) -> None:
        try:
            await generation.open()
        except Exception as exc:  # kept to raise as it is, not inside an exception group
            errors.append(exc)

    async with anyio.create_task_group() as group:
        for generation in generations:
            group.start_soon(open_one, generation)
    if errors:
        await close_all(generations)
        raise errors[0]
    return generations


async def interleave(
    generations: Sequence[Generation],
) -> AsyncIterator[tuple[int, Event]]:
    """Every generation's events with its index, a piece from each in turn, until all finished.
    They decode side by side in the engine, so taking turns delays none of them by much."""
    running = list(range(len(generations)))
    while running:
        for index in list(running):
            event = await generations[index].next()
            if isinstance(event, Finished):
                running.remove(index)
            yield index, event


async def close_all(generations: Sequence[Generation]) -> None:
    for generation in generations:
        await generation.close()
