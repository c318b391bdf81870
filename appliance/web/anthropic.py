"""Anthropic's Messages API, ``POST /v1/messages``, for clients and coding agents that speak it.

``system``, and ``messages`` with text, ``tool_use`` and ``tool_result`` blocks, become a chat
turn served by the same chat path and tool calling as ``/v1/chat/completions``: ``tools``
(``name``, ``description``, ``input_schema``) are offered as function tools, ``tool_choice`` any
or a named tool constrains decoding to a call, and calls come back as ``tool_use`` blocks
(``stop_reason: "tool_use"``). Streamed, the answer is Anthropic's events: message_start, each
content block's start, deltas (``text_delta``, ``input_json_delta``) and stop, message_delta
with the stop reason, message_stop.

Errors use Anthropic's ``{"type": "error", "error": {...}}`` shape (``web/errors.py``); a
stream's late error is an ``error`` event.

Imports: the engine service and tool checks, and the web helpers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any, Literal

from litestar import Request, Response, Router, post
from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, ToolCall, ToolSet
from appliance.engine.service import GenerationOptions, InferenceService, Started
from appliance.web.bodies import InvalidField, implied, offer_body_tools, parse_body, refuse_unsupported
from appliance.web.errors import ANTHROPIC_HANDLERS, anthropic_body, error_tail
from appliance.web.generation import (
    Generation,
    event_stream,
    named_event,
    named_provider,
    open_chat,
    prompt_tokens,
    route_headers,
)

__all__ = ["MessagesBody", "anthropic_router"]

# Messages fields this appliance cannot honour, with the values that ask for nothing.
_UNSUPPORTED = {
    "thinking": ({"type": "disabled"},),
    "mcp_servers": ([],),
    "container": (),
    "context_management": (),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesBody(_Body):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float = Field(default=1.0, ge=0, le=1)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None

    def options(self) -> GenerationOptions:
        refuse_unsupported(self, _UNSUPPORTED)
        options = GenerationOptions(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop_sequences or ()),
            json_schema=self._schema(),
            tools=self._tools(),
            implied=implied(self, "temperature", "top_p"),
        )
        # Unset, top_k stays the engine's default, as on the other compatible APIs.
        return options if self.top_k is None else replace(options, top_k=self.top_k)

    def _schema(self) -> dict[str, Any] | None:
        """output_config's structured output: a JSON schema the answer is decoded under."""
        config = self.output_config or {}
        if config.get("effort") is not None:
            raise InvalidField(
                "output_config.effort is not supported by this appliance",
                param="output_config.effort",
                hint="leave effort out",
            )
        fmt = config.get("format")
        if fmt is None:
            return None
        if (
            not isinstance(fmt, dict)
            or fmt.get("type") != "json_schema"
            or not isinstance(fmt.get("schema"), dict)
        ):
            raise InvalidField(
                'output_config.format must be {"type": "json_schema", "schema": {...}}',
                param="output_config.format",
            )
        schema: dict[str, Any] = fmt["schema"]
        return schema

    def _tools(self) -> ToolSet | None:
        """The tools in OpenAI's function shape, offered through the same checks as chat's."""
        functions = []
        for index, tool in enumerate(self.tools or []):
            if tool.get("type", "custom") != "custom":
                raise InvalidField(
                    f"tools.{index}.type {tool.get('type')!r} is not supported: only custom tools "
                    "(name, description, input_schema) are; Anthropic's own tools run on its side",
                    param=f"tools.{index}.type",
                )
            if not isinstance(tool.get("input_schema"), dict):
                raise InvalidField(
                    f"tools.{index}.input_schema is required (a JSON schema object)",
                    param=f"tools.{index}.input_schema",
                )
            function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
            if "description" in tool:
                function["description"] = tool["description"]
            functions.append({"type": "function", "function": function})
        choice, parallel = self._choice()
        return offer_body_tools(functions, choice, parallel)

    def _choice(self) -> tuple[Any, bool | None]:
        choice = self.tool_choice
        if choice is None:
            return None, None
        parallel = False if choice.get("disable_parallel_tool_use") else None
        kind = choice.get("type")
        if kind in ("auto", "none"):
            return kind, parallel
        if kind == "any":
            return "required", parallel
        if kind == "tool" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}, parallel
        raise InvalidField(
            'tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
            '{"type": "tool", "name": ...}',
            param="tool_choice",
        )

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat turns: the system prompt, then each message's blocks, with
        tool results as ``tool`` turns before the text that came with them."""
        turns: list[dict[str, Any]] = []
        if self.system:
            turns.append({"role": "system", "content": _text(self.system, "system")})
        names: dict[str, str] = {}  # tool_use id -> tool, for the templates that name a result's tool
        for index, message in enumerate(self.messages):
            where = f"messages.{index}.content"
            blocks = (
                [{"type": "text", "text": message.content}]
                if isinstance(message.content, str)
                else message.content
            )
            text: list[str] = []
            calls: list[dict[str, Any]] = []
            for number, block in enumerate(blocks):
                at = f"{where}.{number}"
                kind = block.get("type")
                if kind == "text" and isinstance(block.get("text"), str):
                    text.append(block["text"])
                elif kind == "tool_use" and message.role == "assistant":
                    call = _tool_use(block, at)
                    names[call["id"]] = call["function"]["name"]
                    calls.append(call)
                elif kind == "tool_result" and message.role == "user":
                    turns.append(_tool_result(block, at, names))
                else:
                    raise InvalidField(
                        f"{at}.type {kind!r} is not supported in a {message.role} message; send text, "
                        "tool_use (assistant) and tool_result (user) blocks",
                        param=f"{at}.type",
                    )
            if text or calls or isinstance(message.content, str):
                turn: dict[str, Any] = {"role": message.role, "content": "".join(text)}
                if calls:
                    turn["tool_calls"] = calls
                turns.append(turn)
        return turns


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined; any other kind of block is refused by name."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidField(f"{where} must be a string or a list of text blocks", param=where)
    for number, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text" or not isinstance(block.get("text"), str):
            raise InvalidField(
                f"{where}.{number}.type {kind!r} is not supported; send text blocks",
                param=f"{where}.{number}.type",
            )
    return "".join(block["text"] for block in content)


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An earlier call as chat templates read it."""
    for key in ("id", "name"):
        if not isinstance(block.get(key), str) or not block[key]:
            raise InvalidField(f"{where}.{key} is required (a string)", param=f"{where}.{key}")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise InvalidField(f"{where}.input must be an object", param=f"{where}.input")
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": arguments},
    }


def _tool_result(block: dict[str, Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidField(
            f"{where}.tool_use_id is required: a result answers a tool_use by its id",
            param=f"{where}.tool_use_id",
        )
    content = _text(block.get("content", ""), f"{where}.content")
    if block.get("is_error"):
        content = f"Error: {content}"
    turn = {"role": "tool", "tool_call_id": call_id, "content": content}
    if call_id in names:
        turn["name"] = names[call_id]
    return turn


# -- the answer ----------------------------------------------------------------------------------


def _stop_reason(finished: Finished, body: MessagesBody) -> tuple[str, str | None]:
    """Anthropic's stop_reason and the stop sequence met, if one of the request's was."""
    if finished.reason == "length":
        return "max_tokens", None
    if finished.reason == "tool_calls":
        return "tool_use", None
    if finished.stop_sequence is not None and finished.stop_sequence in (body.stop_sequences or ()):
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


def _tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{call.id.removeprefix('call_')}",
        "name": call.name,
        "input": call.arguments,
    }


def _message(started: Started, message_id: str) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": started.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0},
    }


@post("/messages", status_code=200)
async def create_message(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> Response[Any]:
    body = parse_body(MessagesBody, await request.body())
    options, messages = body.options(), body.chat_messages()
    generation, started = await open_chat(
        inference,
        body.model,
        messages,
        options,
        endpoint="/v1/messages",
        context=context,
        provider=named_provider(request),
    )
    message = _message(started, f"msg_{uuid.uuid4().hex}")
    if body.stream:
        return event_stream(_events(generation, body, message), started)
    text, calls, finished = await generation.collect()
    content = [{"type": "text", "text": text}] if text else []
    content += [_tool_use_block(call) for call in calls]
    stop_reason, stop_sequence = _stop_reason(finished, body)
    message.update(content=content, stop_reason=stop_reason, stop_sequence=stop_sequence)
    message["usage"].update(
        input_tokens=prompt_tokens(started, finished), output_tokens=finished.completion_tokens
    )
    return Response(message, headers=route_headers(started))


async def _events(
    generation: Generation, body: MessagesBody, message: dict[str, Any]
) -> AsyncIterator[bytes]:
    """Anthropic's stream: message_start, the content blocks (text opened at its first text and
    closed before a tool_use), message_delta with the stop reason and usage, message_stop."""
    blocks = 0  # content blocks started so far
    text_open = False

    def event(kind: str, **payload: Any) -> bytes:
        return named_event(kind, {"type": kind, **payload})

    def close_text() -> list[bytes]:
        nonlocal text_open
        if not text_open:
            return []
        text_open = False
        return [event("content_block_stop", index=blocks - 1)]

    async def events() -> AsyncIterator[bytes]:
        nonlocal blocks, text_open
        try:
            yield event("message_start", message=message)
            while not isinstance(piece := await generation.next(), Finished):
                if isinstance(piece, ReasoningChunk):  # thoughts are not part of this API's answer
                    continue
                if isinstance(piece, TextChunk):
                    if not piece.text:
                        continue
                    if not text_open:
                        text_open, blocks = True, blocks + 1
                        block = {"type": "text", "text": ""}
                        yield event("content_block_start", index=blocks - 1, content_block=block)
                    delta = {"type": "text_delta", "text": piece.text}
                    yield event("content_block_delta", index=blocks - 1, delta=delta)
                    continue
                for line in close_text():
                    yield line
                block = _tool_use_block(piece)
                blocks += 1
                yield event("content_block_start", index=blocks - 1, content_block={**block, "input": {}})
                arguments = json.dumps(piece.arguments, ensure_ascii=False)
                delta = {"type": "input_json_delta", "partial_json": arguments}
                yield event("content_block_delta", index=blocks - 1, delta=delta)
                yield event("content_block_stop", index=blocks - 1)
            for line in close_text():
                yield line
            stop_reason, stop_sequence = _stop_reason(piece, body)
            yield event(
                "message_delta",
                delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                usage={
                    # an external provider counts the prompt only at its end
                    "input_tokens": max(message["usage"]["input_tokens"], piece.prompt_tokens),
                    "output_tokens": piece.completion_tokens,
                },
            )
            yield event("message_stop")
        finally:
            await generation.close()

    async for line in error_tail(
        events(),
        lambda info: named_event("error", anthropic_body(info)),
        where=f"a stream of {generation.model}",
    ):
        yield line


anthropic_router = Router(
    path="/v1", route_handlers=[create_message], exception_handlers=ANTHROPIC_HANDLERS, tags=["anthropic"]
)
