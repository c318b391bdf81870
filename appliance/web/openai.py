"""The OpenAI-compatible API under ``/v1``: models, chat completions, completions, embeddings.

Chat completions take ``tools``, ``tool_choice`` and ``parallel_tool_calls``, answer with
``tool_calls`` (streamed as delta chunks: the call's id and name, then its arguments) and take
``tool`` messages and assistant ``tool_calls`` back. A model that thinks answers with its reasoning
block apart, in ``reasoning_content`` (``delta.reasoning_content`` when streamed), as llama.cpp's
server and DeepSeek's API do. Completions take ``suffix`` (fill in the middle) for models with FIM
tokens.

Field names follow OpenAI's spec exactly; errors use OpenAI's ``{"error": {...}}`` shape,
from the one mapping in ``web/errors.py`` (a stream's late error too).

Imports: the services (models, engine service) and the web helpers; never the store or the cache.
"""

from __future__ import annotations

import base64
import calendar
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

from litestar import Request, Response, Router, get, post
from litestar.response import Stream
from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, ToolCall
from appliance.engine.service import GenerationOptions, InferenceService, Started
from appliance.engine.tools import offer_tools
from appliance.errors import InvalidInput
from appliance.models.service import ModelService
from appliance.settings import Duration
from appliance.web.bodies import InvalidField, parse_body, refuse_unsupported
from appliance.web.errors import OPENAI_HANDLERS, error_tail, openai_body
from appliance.web.generation import Generation

__all__ = ["openai_router"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# OpenAI fields this appliance does not implement yet, with the values that ask for nothing.
_UNSUPPORTED = {
    "functions": ([],),
    "function_call": ("none",),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
}
_UNSUPPORTED_COMPLETION = {
    "echo": (False,),
    "best_of": (1,),
    "tools": ([],),
    "tool_choice": ("none",),
}
_ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessage(_Body):
    role: str = Field(json_schema_extra={"enum": list(_ROLES)})  # checked in turn(), to name the field
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def turn(self, index: int) -> dict[str, Any]:
        """The message for the chat template; a role or content part it cannot show is refused."""
        where = f"messages.{index}"
        if self.role not in _ROLES:
            raise InvalidField(
                f"{where}.role {self.role!r} is not supported; use one of {', '.join(_ROLES)}",
                param=f"{where}.role",
            )
        refuse_unsupported(self, {"function_call": ()}, where=f"{where}.")
        if self.tool_calls and self.role != "assistant":
            raise InvalidField(
                f"{where}.tool_calls belong to assistant messages", param=f"{where}.tool_calls"
            )
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidField(
                f"{where}.tool_call_id is required: a tool message answers a call by its id",
                param=f"{where}.tool_call_id",
            )
        if isinstance(self.content, list):
            for number, part in enumerate(self.content):
                if part.get("type") != "text":
                    raise InvalidField(
                        f"{where}.content.{number}.type {part.get('type')!r} is not supported; send text",
                        param=f"{where}.content.{number}.type",
                    )
            text = "".join(str(part.get("text", "")) for part in self.content)
        else:
            text = self.content or ""
        # OpenAI's developer role is its newer name for system, which chat templates know.
        role = "system" if self.role == "developer" else self.role
        turn = {**self.model_dump(exclude_none=True), "role": role, "content": text}
        if self.tool_calls:
            turn["tool_calls"] = [
                _template_call(call, where=f"{where}.tool_calls.{number}")
                for number, call in enumerate(self.tool_calls)
            ]
        return turn


def _template_call(call: dict[str, Any], *, where: str) -> dict[str, Any]:
    """An earlier call as chat templates read it: arguments as an object, not OpenAI's JSON string."""
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise InvalidField(f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
    if not isinstance(function.get("name"), str):
        raise InvalidField(f"{where}.function.name is required", param=f"{where}.function.name")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidField(
            f"{where}.function.arguments must be a JSON object, as a string",
            param=f"{where}.function.arguments",
        )
    return {
        "id": str(call.get("id") or ""),
        "type": "function",
        "function": {"name": function["name"], "arguments": parsed},
    }


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    keep_alive: Duration | None = None

    def options(self) -> GenerationOptions:
        refuse_unsupported(self, _UNSUPPORTED)
        fmt = (self.response_format or {}).get("type", "text")
        if fmt not in ("text", "json_object", "json_schema"):
            raise InvalidInput(
                f"response_format type {fmt!r} is not supported; use text, json_object or json_schema"
            )
        schema = None
        if fmt == "json_schema":
            schema = ((self.response_format or {}).get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidInput("response_format json_schema needs json_schema.schema to be an object")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationOptions(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=stop,
            json_mode=fmt == "json_object",
            json_schema=schema,
            keep_alive=self.keep_alive,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def options(self) -> GenerationOptions:
        try:
            tools = offer_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except InvalidInput as exc:  # OpenAI's errors name the field at fault
            field = "tool_choice" if exc.message.startswith("tool_choice") else "tools"
            raise InvalidField(exc.message, param=field, hint=exc.hint or None) from exc
        return replace(super().options(), tools=tools)


class CompletionBody(_GenerationBody):
    prompt: str | Annotated[list[str], Field(json_schema_extra={"minItems": 1, "maxItems": 1})]
    suffix: str | None = None  # fill in the middle, for models with FIM tokens

    def options(self) -> GenerationOptions:
        refuse_unsupported(self, _UNSUPPORTED_COMPLETION)
        return super().options()

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidInput("only one prompt per request is supported")
            return self.prompt[0]
        return self.prompt


class EmbeddingBody(_Body):
    model: str
    input: str | Annotated[list[str], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str]:
        refuse_unsupported(self, {"dimensions": ()})
        return [self.input] if isinstance(self.input, str) else self.input


def _usage(started: Started, finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": started.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": started.prompt_tokens + finished.completion_tokens,
    }


def _finish_reason(finished: Finished) -> str:
    return finished.reason if finished.reason in ("length", "tool_calls") else "stop"


def _tool_call(call: ToolCall) -> dict[str, Any]:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _route_headers(started: Started) -> dict[str, str]:
    return {"X-Appliance-Engine": started.route.engine, "X-Appliance-Route-Reason": started.route.reason}


@get("/models", sync_to_thread=True)
def list_models(models: ModelService) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [_model_entry(model) for model in models.list_models() if "gguf" in model.formats],
    }


@get("/models/{name:path}", sync_to_thread=True)
def retrieve_model(name: str, models: ModelService) -> dict[str, Any]:
    return _model_entry(models.get(name.lstrip("/")))


def _model_entry(model: Any) -> dict[str, Any]:
    # created_at is UTC: timegm reads it as such (mktime would shift it by the server's zone).
    created = calendar.timegm(time.strptime(model.created_at[:19], "%Y-%m-%dT%H:%M:%S"))
    return {"id": str(model.name), "object": "model", "created": created, "owned_by": "appliance"}


@post("/chat/completions", status_code=200)
async def chat_completions(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> Response[Any]:
    body = parse_body(ChatCompletionBody, await request.body())
    messages = [message.turn(index) for index, message in enumerate(body.messages)]
    options = body.options()
    generation = Generation(
        inference.chat(
            body.model,
            messages,
            options,
            endpoint="/v1/chat/completions",
            correlation_id=context.correlation_id,
        )
    )
    started = await generation.open()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return Stream(
            _chat_chunks(generation, started, completion_id, created, include_usage=body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **_route_headers(started)},
        )
    text, calls, finished = await generation.collect()
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if generation.reasoning:
        message["reasoning_content"] = generation.reasoning
    if calls:
        message.update(content=text or None, tool_calls=[_tool_call(call) for call in calls])
    return Response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": started.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _finish_reason(finished),
                }
            ],
            "usage": _usage(started, finished),
        },
        headers=_route_headers(started),
    )


async def _sse_events(
    generation: Generation,
    chunks: Callable[[TextChunk | ReasoningChunk | ToolCall], list[dict[str, Any]]],
    final: Callable[[Finished], list[dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """The SSE body: ``chunks(event)``'s payloads per piece, ``final(finished)``'s, then [DONE];
    an error after the headers went out can only be said inside the stream."""

    async def events() -> AsyncIterator[bytes]:
        try:
            while not isinstance(event := await generation.next(), Finished):
                for payload in chunks(event):
                    yield _sse(payload)
            for payload in final(event):
                yield _sse(payload)
        finally:
            await generation.close()

    async for line in error_tail(
        events(), lambda info: _sse(openai_body(info)), where=f"a stream of {generation.model}"
    ):
        yield line
    yield b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _chat_chunks(
    generation: Generation,
    started: Started,
    completion_id: str,
    created: int,
    *,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": started.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def final(finished: Finished) -> list[dict[str, Any]]:
        last = [chunk({}, _finish_reason(finished))]
        if include_usage:
            last.append({**chunk({}, None), "choices": [], "usage": _usage(started, finished)})
        return last

    calls_sent = 0

    def chunks(event: TextChunk | ReasoningChunk | ToolCall) -> list[dict[str, Any]]:
        nonlocal calls_sent
        if isinstance(event, TextChunk):
            return [chunk({"content": event.text}, None)]
        if isinstance(event, ReasoningChunk):
            return [chunk({"reasoning_content": event.text}, None)]
        index, calls_sent = calls_sent, calls_sent + 1
        whole = _tool_call(event)
        arguments = whole["function"]["arguments"]
        whole["function"]["arguments"] = ""
        return [  # as OpenAI streams a call: its id and name first, then its arguments
            chunk({"tool_calls": [{"index": index, **whole}]}, None),
            chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}, None),
        ]

    yield _sse(chunk({"role": "assistant", "content": ""}, None))
    async for line in _sse_events(generation, chunks, final):
        yield line


@post("/completions", status_code=200)
async def completions(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> Response[Any]:
    body = parse_body(CompletionBody, await request.body())
    options, prompt = body.options(), body.prompt_text()
    generation = Generation(
        inference.complete(
            body.model,
            prompt,
            options,
            endpoint="/v1/completions",
            correlation_id=context.correlation_id,
            suffix=body.suffix or None,
        )
    )
    started = await generation.open()
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def payload(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": started.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }

    if body.stream:

        def final(finished: Finished) -> list[dict[str, Any]]:
            last = [payload("", _finish_reason(finished))]
            if body.include_usage:
                last.append({**payload("", None), "choices": [], "usage": _usage(started, finished)})
            return last

        return Stream(
            _sse_events(generation, lambda event: [payload(getattr(event, "text", ""), None)], final),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **_route_headers(started)},
        )
    text, _, finished = await generation.collect()
    return Response(
        {**payload(text, _finish_reason(finished)), "usage": _usage(started, finished)},
        headers=_route_headers(started),
    )


@post("/embeddings", status_code=200)
async def embeddings(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> dict[str, Any]:
    body = parse_body(EmbeddingBody, await request.body())
    inputs = body.inputs()
    vectors, tokens, _, model = await inference.embed(
        body.model, inputs, keep_alive=None, endpoint="/v1/embeddings", correlation_id=context.correlation_id
    )
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encode(vector, body.encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's base64 form: the little-endian float32 array, base64-encoded (its client asks for it)."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


openai_router = Router(
    path="/v1",
    route_handlers=[list_models, retrieve_model, chat_completions, completions, embeddings],
    exception_handlers=OPENAI_HANDLERS,
    tags=["openai"],
)
