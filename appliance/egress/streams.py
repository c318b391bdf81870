"""Reading providers' answers: server-sent events, and each kind's stream as the engine's events.

``read_events`` turns a body's lines into ``(event, data)`` pairs (SSE: ``event:`` and ``data:``
fields, a blank line ends one, ``:`` lines are comments). A decoder takes each pair and returns
the events it completes:

- ``OpenAIStream``: chat chunks (``delta.content``, ``delta.reasoning_content`` or ``reasoning``,
  ``delta.tool_calls`` assembled by index) or completion chunks (``text``), ``finish_reason``, the
  ``usage`` chunk, ``[DONE]``;
- ``AnthropicStream``: message_start (input tokens), content_block_start / _delta (text_delta,
  thinking_delta, input_json_delta) / _stop (a tool_use block becomes its ToolCall), message_delta
  (stop reason, output tokens), message_stop, error.

A stream that ends before its end marker, or a call whose arguments are not JSON, raises
``StreamBroken``; an ``error`` in the stream raises ``StreamError`` (the client decides whether
to retry). Also here: the error message of a provider's error body, and its model list.

Imports: the engine's event types.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.base import Finished, ReasoningChunk, TextChunk, ToolCall

__all__ = [
    "AnthropicStream",
    "Decoded",
    "OpenAIStream",
    "StreamBroken",
    "StreamError",
    "error_message",
    "model_ids",
    "read_events",
]

Decoded = TextChunk | ReasoningChunk | ToolCall

_OPENAI_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
_ANTHROPIC_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


class StreamBroken(Exception):
    """The answer broke off or made no sense; the message says how."""


class StreamError(Exception):
    """The provider reported an error inside its stream."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


async def read_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """``(event name, data)`` per server-sent event; the name is "message" when none is given."""
    name, data = "", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield name or "message", "\n".join(data)
            name, data = "", []
        elif line.startswith(":"):
            continue
        else:
            field_name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field_name == "event":
                name = value
            elif field_name == "data":
                data.append(value)
    if data:
        yield name or "message", "\n".join(data)


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)

    def done(self) -> ToolCall:
        text = "".join(self.arguments).strip() or "{}"
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StreamBroken(f"the arguments of its call to {self.name} are not JSON") from exc
        if not isinstance(arguments, dict):
            raise StreamBroken(f"the arguments of its call to {self.name} are not a JSON object")
        return ToolCall(id=self.id, name=self.name, arguments=arguments)


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reason: str | None = None
    stop_sequence: str | None = None
    ended: bool = False


class OpenAIStream:
    """An OpenAI chat or completion stream; ``finish()`` is its Finished, once ``[DONE]`` came."""

    def __init__(self) -> None:
        self.usage = _Usage()
        self._calls: dict[int, _Call] = {}
        self._called = False

    def feed(self, name: str, data: str) -> list[Decoded]:
        if data.strip() == "[DONE]":
            self.usage.ended = True
            return self._calls_done()
        chunk = _json(data)
        if "error" in chunk:
            raise StreamError(_message_of(chunk), retryable=False)
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
            self.usage.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.usage.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            self.usage.cached_tokens = int(details.get("cached_tokens") or 0)
        out: list[Decoded] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(ReasoningChunk(reasoning))
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(text, str) and text:
                out.append(TextChunk(text))
            for part in delta.get("tool_calls") or ():
                self._add_call(part)
            if choice.get("finish_reason"):
                self.usage.reason = _OPENAI_FINISH.get(choice["finish_reason"], "stop")
                if isinstance(choice.get("stop_reason"), str):  # vLLM says which stop string
                    self.usage.stop_sequence = choice["stop_reason"]
                out.extend(self._calls_done())  # the calls are whole once the choice finishes
        return out

    def finish(self) -> Finished:
        if not self.usage.ended:
            raise StreamBroken("its answer ended before [DONE]")
        reason = "tool_calls" if self._called else (self.usage.reason or "stop")
        return _finished(self.usage, reason)

    def _add_call(self, part: dict[str, Any]) -> None:
        index = int(part.get("index", 0))
        function = part.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = _Call(id=str(part.get("id") or f"call_{index}"), name="")
        if function.get("name"):
            call.name = function["name"]
        if function.get("arguments"):
            call.arguments.append(function["arguments"])

    def _calls_done(self) -> list[Decoded]:
        calls: list[Decoded] = [self._calls[index].done() for index in sorted(self._calls)]
        self._called = self._called or bool(calls)
        self._calls.clear()
        return calls


class AnthropicStream:
    """Anthropic's Messages events; ``finish()`` is its Finished, once message_stop came."""

    def __init__(self) -> None:
        self.usage = _Usage()
        self._calls: dict[int, _Call] = {}
        self._called = False

    def feed(self, name: str, data: str) -> list[Decoded]:
        event = _json(data)
        kind = event.get("type", name)
        if kind == "error":
            error = event.get("error") or {}
            retryable = error.get("type") in ("overloaded_error", "api_error", "rate_limit_error")
            raise StreamError(_message_of(event), retryable=retryable)
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self._count(usage)
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            index = int(event.get("index", 0))
            if block.get("type") == "tool_use":
                self._calls[index] = _Call(
                    id=str(block.get("id") or f"toolu_{index}"), name=block.get("name", "")
                )
                if block.get("input"):
                    self._calls[index].arguments.append(json.dumps(block["input"]))
            elif block.get("type") == "text" and block.get("text"):
                return [TextChunk(block["text"])]
        elif kind == "content_block_delta":
            return self._delta(int(event.get("index", 0)), event.get("delta") or {})
        elif kind == "content_block_stop":
            call = self._calls.pop(int(event.get("index", 0)), None)
            if call is not None:
                self._called = True
                return [call.done()]
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            if delta.get("stop_reason"):
                self.usage.reason = _ANTHROPIC_STOP.get(delta["stop_reason"], "stop")
            if delta.get("stop_sequence"):
                self.usage.stop_sequence = delta["stop_sequence"]
            self._count(event.get("usage") or {})
        elif kind == "message_stop":
            self.usage.ended = True
        return []

    def finish(self) -> Finished:
        if not self.usage.ended:
            raise StreamBroken("its answer ended before message_stop")
        reason = "tool_calls" if self._called else (self.usage.reason or "stop")
        return _finished(self.usage, reason)

    def _delta(self, index: int, delta: dict[str, Any]) -> list[Decoded]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [TextChunk(delta["text"])]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [ReasoningChunk(delta["thinking"])]
        if kind == "input_json_delta" and index in self._calls:
            self._calls[index].arguments.append(delta.get("partial_json") or "")
        return []  # signature_delta, citations_delta: nothing a client of ours reads

    def _count(self, usage: dict[str, Any]) -> None:
        """Anthropic's counts are running totals; the prompt is its input plus the cache's tokens."""
        if "input_tokens" in usage:
            read = int(usage.get("cache_read_input_tokens") or 0)
            written = int(usage.get("cache_creation_input_tokens") or 0)
            self.usage.prompt_tokens = int(usage["input_tokens"] or 0) + read + written
            self.usage.cached_tokens = read
        if "output_tokens" in usage:
            self.usage.completion_tokens = int(usage["output_tokens"] or 0)


def error_message(body: bytes) -> str:
    """What a provider's error body says (OpenAI's and Anthropic's shapes alike), or its text."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(document, dict):
        return _message_of(document)[:500]
    return str(document)[:500]


def model_ids(body: bytes) -> list[str]:
    """The ids of a model list (``{"data": [{"id": ...}]}``, both kinds); empty when it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    data = document.get("data") if isinstance(document, dict) else None
    return [str(item["id"]) for item in data or () if isinstance(item, dict) and "id" in item]


def _message_of(document: dict[str, Any]) -> str:
    error = document.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    if isinstance(error, str):
        return error
    return str(document.get("message") or document.get("detail") or json.dumps(document))


def _json(data: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StreamBroken(f"it sent an event that is not JSON: {data[:80]!r}") from exc
    if not isinstance(document, dict):
        raise StreamBroken(f"it sent an event that is not a JSON object: {data[:80]!r}")
    return document


def _finished(usage: _Usage, reason: str) -> Finished:
    return Finished(
        reason,
        usage.prompt_tokens,
        usage.completion_tokens,
        stop_sequence=usage.stop_sequence,
        cached_tokens=usage.cached_tokens,
    )
