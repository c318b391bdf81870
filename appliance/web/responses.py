"""OpenAI's Responses API, ``POST /v1/responses``, served statelessly.

The request's ``input`` (a string, or message, ``function_call`` and ``function_call_output``
items) and ``instructions`` become a chat turn, served by the same chat path and tool calling as
``/v1/chat/completions``; the answer is ``output`` items (a message with ``output_text``, one
``function_call`` item per call) or, streamed, the Responses events with sequence numbers.
Nothing is kept: ``store: true``, ``previous_response_id`` and ``conversation`` are refused, so a
client sends the whole conversation each time.

Errors use OpenAI's ``{"error": {...}}`` shape (``web/errors.py``); a stream's late error is an
``error`` event.

Imports: the engine service and tool checks, and the web helpers of the OpenAI surface.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from litestar import Request, Response, Router, post
from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, ToolCall, ToolSet
from appliance.engine.service import GenerationOptions, InferenceService, Started
from appliance.settings import Duration
from appliance.web.bodies import InvalidField, implied, offer_body_tools, parse_body, refuse_unsupported
from appliance.web.errors import OPENAI_HANDLERS, error_tail
from appliance.web.generation import (
    Generation,
    event_stream,
    named_event,
    named_provider,
    open_chat,
    prompt_tokens,
    route_headers,
)

__all__ = ["ResponsesBody", "responses_router"]

# Responses fields this appliance cannot honour, with the values that ask for nothing.
_UNSUPPORTED = {
    "background": (False,),
    "include": ([],),
    "reasoning": ({},),
    "top_logprobs": (0,),
    "truncation": ("disabled",),
    "max_tool_calls": (),
    "prompt": (),
    "service_tier": ("auto", "default"),
}
_STATELESS = "this appliance keeps no responses: the Responses API is served statelessly"
_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    keep_alive: Duration | None = None

    def options(self) -> GenerationOptions:
        if self.store:
            raise InvalidField(
                f"store: true is not supported; {_STATELESS}",
                param="store",
                hint="send store: false (or leave it out)",
            )
        for field_name in ("previous_response_id", "conversation"):
            if getattr(self, field_name, None) is not None:  # conversation is an extra: an attribute too
                raise InvalidField(
                    f"{field_name} is not supported; {_STATELESS}",
                    param=field_name,
                    hint="send the whole conversation in input instead",
                )
        refuse_unsupported(self, _UNSUPPORTED)
        json_mode, schema = self._format()
        return GenerationOptions(
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            json_mode=json_mode,
            json_schema=schema,
            keep_alive=self.keep_alive,
            tools=self._tools(),
            implied=implied(self, "temperature", "top_p"),
        )

    def _format(self) -> tuple[bool, dict[str, Any] | None]:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise InvalidField(
                f"text.format type {kind!r} is not supported; use text, json_object or json_schema",
                param="text.format.type",
            )
        if kind != "json_schema":
            return kind == "json_object", None
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidField(
                "text.format json_schema needs schema to be an object", param="text.format.schema"
            )
        return False, schema

    def _tools(self) -> ToolSet | None:
        """The function tools in chat completions' shape, offered through the same checks."""
        chat_tools = []
        for index, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                raise InvalidField(
                    f"tools.{index}.type {tool.get('type')!r} is not supported: only function tools are "
                    "(OpenAI's hosted tools run on OpenAI's side)",
                    param=f"tools.{index}.type",
                )
            keys = ("name", "description", "parameters", "strict")
            chat_tools.append({"type": "function", "function": {k: tool[k] for k in keys if k in tool}})
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise InvalidField(
                    'tool_choice as an object must be {"type": "function", "name": ...}',
                    param="tool_choice",
                )
            choice = {"type": "function", "function": {"name": choice["name"]}}
        return offer_body_tools(chat_tools, choice, self.parallel_tool_calls)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat turns: instructions first, calls and their outputs in place."""
        turns: list[dict[str, Any]] = []
        if self.instructions:
            turns.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*turns, {"role": "user", "content": self.input}]
        names: dict[str, str] = {}  # call_id -> function, for the templates that name a result's tool
        for index, item in enumerate(self.input):
            where = f"input.{index}"
            kind = item.get("type", "message")
            if kind == "message":
                turns.append(_message_turn(item, where))
            elif kind == "function_call":
                call = _call_turn(item, where)
                names[call["id"]] = call["function"]["name"]
                previous = turns[-1] if turns else None
                if previous is not None and previous["role"] == "assistant":
                    previous.setdefault("tool_calls", []).append(call)  # the same answer's calls
                else:
                    turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                call_id = _string(item, "call_id", where)
                output = item.get("output")
                turn = {"role": "tool", "tool_call_id": call_id, "content": _text(output, f"{where}.output")}
                if call_id in names:
                    turn["name"] = names[call_id]
                turns.append(turn)
            else:
                raise InvalidField(
                    f"{where}.type {kind!r} is not supported; send message, function_call and "
                    "function_call_output items",
                    param=f"{where}.type",
                )
        return _one_system_turn(turns)


def _one_system_turn(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instructions and leading system or developer messages as one system turn: many chat
    templates take a system message only as the first turn."""
    leading = 0
    while leading < len(turns) and turns[leading]["role"] == "system":
        leading += 1
    if leading < 2:
        return turns
    joined = "\n\n".join(turn["content"] for turn in turns[:leading] if turn["content"])
    return [{"role": "system", "content": joined}, *turns[leading:]]


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidField(f"{where}.{key} is required (a string)", param=f"{where}.{key}")
    return value


def _text(content: Any, where: str) -> str:
    """A string, or text parts joined; any other kind of part is refused by name."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidField(f"{where} must be a string or a list of text parts", param=where)
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidField(
                f"{where}.{number}.type {kind!r} is not supported; send input_text parts",
                param=f"{where}.{number}.type",
            )
    return "".join(part["text"] for part in content)


def _message_turn(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidField(
            f"{where}.role {role!r} is not supported; use one of {', '.join(_ROLES)}", param=f"{where}.role"
        )
    # developer is OpenAI's newer name for system, which chat templates know.
    return {
        "role": "system" if role == "developer" else role,
        "content": _text(item.get("content"), f"{where}.content"),
    }


def _call_turn(item: dict[str, Any], where: str) -> dict[str, Any]:
    """An earlier call as chat templates read it: arguments as an object, not a JSON string."""
    call_id, name = _string(item, "call_id", where), _string(item, "name", where)
    arguments = item.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidField(
            f"{where}.arguments must be a JSON object, as a string", param=f"{where}.arguments"
        )
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}


# -- the answer ----------------------------------------------------------------------------------


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: ToolCall, item_id: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Reply:
    """One response as it grows: the request's settings echoed, the output items, the usage."""

    body: ResponsesBody
    started: Started
    id: str = field(default_factory=lambda: _item_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)

    def snapshot(self, finished: Finished | None) -> dict[str, Any]:
        status = "in_progress"
        if finished is not None:
            status = "incomplete" if finished.reason == "length" else "completed"
        text = "".join(
            part["text"] for item in self.output if item["type"] == "message" for part in item["content"]
        )
        usage = None
        if finished is not None:
            output_tokens = finished.completion_tokens
            input_tokens = prompt_tokens(self.started, finished)
            usage = {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": finished.cached_tokens},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            }
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.started.model,
            "output": self.output,
            "output_text": text,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "store": False,
            "temperature": body.temperature,
            "text": body.text or {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.metadata or {},
        }


@post("/responses", status_code=200)
async def create_response(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> Response[Any]:
    body = parse_body(ResponsesBody, await request.body())
    options, messages = body.options(), body.messages()
    generation, started = await open_chat(
        inference,
        body.model,
        messages,
        options,
        endpoint="/v1/responses",
        context=context,
        provider=named_provider(request),
    )
    reply = _Reply(body, started)
    if body.stream:
        return event_stream(_events(generation, reply), started)
    text, calls, finished = await generation.collect()
    if text or not calls:
        reply.output.append(_message_item(_item_id("msg"), text, "completed"))
    for call in calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        reply.output.append(_call_item(call, _item_id("fc"), arguments, "completed"))
    return Response(reply.snapshot(finished), headers=route_headers(started))


async def _events(generation: Generation, reply: _Reply) -> AsyncIterator[bytes]:
    """The Responses stream: created, each output item added, its deltas and done, then completed
    (or incomplete at max_output_tokens); every event numbered in order."""
    sequence = 0

    def event(kind: str, **payload: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        return named_event(kind, {"type": kind, "sequence_number": sequence - 1, **payload})

    message: dict[str, Any] | None = None  # the message item being streamed, while open

    def close_message() -> list[bytes]:
        nonlocal message
        if message is None:
            return []
        index, text = reply.output.index(message), message["content"][0]["text"]
        message["status"] = "completed"
        place = {"item_id": message["id"], "output_index": index, "content_index": 0}
        closed = [
            event("response.output_text.done", **place, text=text, logprobs=[]),
            event("response.content_part.done", **place, part=message["content"][0]),
            event("response.output_item.done", output_index=index, item=message),
        ]
        message = None
        return closed

    async def events() -> AsyncIterator[bytes]:
        nonlocal message
        try:
            yield event("response.created", response=reply.snapshot(None))
            yield event("response.in_progress", response=reply.snapshot(None))
            while not isinstance(piece := await generation.next(), Finished):
                if isinstance(piece, ReasoningChunk):  # thoughts are not part of this API's answer
                    continue
                if isinstance(piece, TextChunk):
                    if not piece.text:
                        continue
                    if message is None:
                        message = _message_item(_item_id("msg"), "", "in_progress")
                        reply.output.append(message)
                        index = len(reply.output) - 1
                        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                        yield event(
                            "response.output_item.added", output_index=index, item={**message, "content": []}
                        )
                        yield event(
                            "response.content_part.added",
                            item_id=message["id"],
                            output_index=index,
                            content_index=0,
                            part=empty,
                        )
                    message["content"][0]["text"] += piece.text
                    yield event(
                        "response.output_text.delta",
                        item_id=message["id"],
                        output_index=reply.output.index(message),
                        content_index=0,
                        delta=piece.text,
                        logprobs=[],
                    )
                    continue
                for line in close_message():
                    yield line
                arguments = json.dumps(piece.arguments, ensure_ascii=False)
                item = _call_item(piece, _item_id("fc"), arguments, "completed")
                index = len(reply.output)
                reply.output.append(item)
                place = {"item_id": item["id"], "output_index": index}
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
                yield event("response.function_call_arguments.delta", **place, delta=arguments)
                yield event(
                    "response.function_call_arguments.done", **place, name=piece.name, arguments=arguments
                )
                yield event("response.output_item.done", output_index=index, item=item)
            for line in close_message():
                yield line
            last = reply.snapshot(piece)
            yield event(f"response.{last['status']}", response=last)
        finally:
            await generation.close()

    def failed(info: Any) -> bytes:
        return event("error", code=info.code, message=info.text, param=info.param)

    async for line in error_tail(events(), failed, where=f"a stream of {generation.model}"):
        yield line


responses_router = Router(
    path="/v1", route_handlers=[create_response], exception_handlers=OPENAI_HANDLERS, tags=["openai"]
)
