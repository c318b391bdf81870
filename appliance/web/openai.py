"""The OpenAI-compatible API under ``/v1``: models, chat completions, embeddings (the legacy
completions are in ``web/completions.py``, on the same helpers).

Chat completions take ``tools``, ``tool_choice`` and ``parallel_tool_calls``, answer with
``tool_calls`` (streamed as delta chunks: the call's id and name, then its arguments) and take
``tool`` messages and assistant ``tool_calls`` back. A model that thinks answers with its reasoning
block apart, in ``reasoning_content`` (``delta.reasoning_content`` when streamed), as llama.cpp's
server and DeepSeek's API do.

``n`` > 1 answers with that many choices, decoded as parallel sequences (seeds ``seed``,
``seed + 1``, … when a seed is given; each choice reads its own tool calls), streamed as
interleaved chunks that carry their choice's index; usage counts the prompt once and every
choice's tokens. ``logprobs``/``top_logprobs`` (chat) and ``logprobs: N`` (completions) return
each token's logprob in the API's own form (``web/logprobs.py``), streamed with the text.

Field names follow OpenAI's spec exactly; errors use OpenAI's ``{"error": {...}}`` shape,
from the one mapping in ``web/errors.py`` (a stream's late error too).

Imports: the services (models, engine service) and the web helpers; never the store or the cache.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from litestar import MediaType, Request, Response, Router, get, post
from litestar.serialization import encode_json
from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, TokenLogprob, ToolCall
from appliance.engine.router import Router as EngineRouter
from appliance.engine.service import GenerationOptions, InferenceService, Started
from appliance.errors import InvalidInput
from appliance.models.service import Model, ModelService, ModelSummary
from appliance.settings import Duration
from appliance.web.bodies import InvalidField, implied, offer_body_tools, parse_body, refuse_unsupported
from appliance.web.errors import OPENAI_HANDLERS, error_tail, openai_body
from appliance.web.generation import (
    Events,
    Generation,
    close_all,
    event_stream,
    interleave,
    named_provider,
    open_choices,
    prompt_tokens,
    route_headers,
)
from appliance.web.lists import CACHED_LIST
from appliance.web.logprobs import chat_logprobs

__all__ = [
    "GenerationBody",
    "Piece",
    "choices_usage",
    "finish_reason_of",
    "open_generations",
    "openai_router",
    "sse_events",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# OpenAI fields this appliance does not implement yet, with the values that ask for nothing.
_UNSUPPORTED = {
    "functions": ([],),
    "function_call": ("none",),
    "logit_bias": ({},),
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


# Each choice holds one of the model's parallel sequences (engine.parallel) or waits for one.
MAX_CHOICES = 16


class GenerationBody(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices to generate, decoded in parallel")
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
            implied=implied(self, "temperature", "top_p", "frequency_penalty", "presence_penalty"),
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def choice_options(self, options: GenerationOptions) -> list[GenerationOptions]:
        """One set of options per choice: seeds seed, seed + 1, … so that seeded choices differ
        from each other and repeat from one request to the next."""
        if options.seed is None:
            return [options] * self.n
        return [replace(options, seed=options.seed + index) for index in range(self.n)]


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def options(self) -> GenerationOptions:
        tools = offer_body_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        if self.top_logprobs and not self.logprobs:
            raise InvalidField(
                "top_logprobs needs logprobs to be true", param="top_logprobs", hint="send logprobs: true"
            )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return replace(super().options(), tools=tools, logprobs=logprobs)


class EmbeddingBody(_Body):
    model: str
    input: str | Annotated[list[str], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str]:
        refuse_unsupported(self, {"dimensions": ()})
        return [self.input] if isinstance(self.input, str) else self.input


def choices_usage(started: Started, finished: list[Finished]) -> dict[str, Any]:
    """The prompt once (every choice reads the same one), every choice's completion; cached: the
    prompt tokens every choice took from the KV cache of an earlier request."""
    completion = sum(each.completion_tokens for each in finished)
    cached = min((each.cached_tokens for each in finished), default=0)
    prompt = max((prompt_tokens(started, each) for each in finished), default=started.prompt_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def finish_reason_of(finished: Finished) -> str:
    return finished.reason if finished.reason in ("length", "tool_calls") else "stop"


def _tool_call(call: ToolCall) -> dict[str, Any]:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


@get("/models", sync_to_thread=True, responses={200: CACHED_LIST})
def list_models(models: ModelService, router: EngineRouter) -> Response[bytes]:
    """The GGUF models, then the models allowed external providers list (as ``provider/model``,
    owned by the provider); the answer is kept until the registry or those models change."""
    external = [
        {"id": name, "object": "model", "created": _created(provider.created_at), "owned_by": provider.name}
        for name, provider in router.external_models()
    ]

    def render(summaries: list[ModelSummary]) -> bytes:
        return encode_json({"object": "list", "data": [*map(_model_entry, summaries), *external]})

    variant = json.dumps(external)
    return Response(models.cached_list("openai.models", render, variant=variant), media_type=MediaType.JSON)


@get("/models/{name:path}", sync_to_thread=True)
def retrieve_model(name: str, models: ModelService) -> dict[str, Any]:
    return _model_entry(models.get(name.lstrip("/")))


def _model_entry(model: Model | ModelSummary) -> dict[str, Any]:
    created = _created(model.created_at)
    return {"id": str(model.name), "object": "model", "created": created, "owned_by": "appliance"}


def _created(at: str) -> int:
    # Stored UTC, to the second (fromisoformat is ~20x faster than strptime: 10,000 models a list).
    return int(datetime.fromisoformat(at[:19]).replace(tzinfo=UTC).timestamp())


async def open_generations(
    body: GenerationBody, stream: Callable[[GenerationOptions], Events]
) -> tuple[list[Generation], Started]:
    """One generation per choice the body asks for, opened together, and how the first started."""
    generations = await open_choices([stream(options) for options in body.choice_options(body.options())])
    started = generations[0].started
    assert started is not None
    return generations, started


@post("/chat/completions", status_code=200)
async def chat_completions(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> Response[Any]:
    body = parse_body(ChatCompletionBody, await request.body())
    messages = [message.turn(index) for index, message in enumerate(body.messages)]
    generations, started = await open_generations(
        body,
        lambda options: inference.chat(
            body.model,
            messages,
            options,
            endpoint="/v1/chat/completions",
            context=context,
            provider=named_provider(request),
        ),
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        chunks = _chat_chunks(
            generations,
            started,
            completion_id,
            created,
            include_usage=body.include_usage,
            logprobs=bool(body.logprobs),
        )
        return event_stream(chunks, started)
    choices, finished = [], []
    try:
        for index, generation in enumerate(generations):
            text, calls, ended = await generation.collect()
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if generation.reasoning:
                message["reasoning_content"] = generation.reasoning
            if calls:
                message.update(content=text or None, tool_calls=[_tool_call(call) for call in calls])
            logprobs = chat_logprobs(generation.logprobs) if body.logprobs else None
            reason = finish_reason_of(ended)
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
            )
            finished.append(ended)
    finally:  # a choice that failed leaves none of the others decoding
        await close_all(generations)
    return Response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": started.model,
            "choices": choices,
            "usage": choices_usage(started, finished),
        },
        headers=route_headers(started),
    )


Piece = TextChunk | ReasoningChunk | ToolCall | Finished


async def sse_events(
    generations: list[Generation],
    payloads: Callable[[int, Piece], list[dict[str, Any]]],
    closing: Callable[[list[Finished]], list[dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """The SSE body: ``payloads(choice, event)`` for every choice's events as they come,
    ``closing(finished)`` once all have finished, then [DONE]; an error after the headers went out
    can only be said inside the stream."""

    async def events() -> AsyncIterator[bytes]:
        finished: list[Finished] = []
        try:
            async for index, event in interleave(generations):
                if isinstance(event, Finished):
                    finished.append(event)
                for payload in payloads(index, event):
                    yield _sse(payload)
            for payload in closing(finished):
                yield _sse(payload)
        finally:
            await close_all(generations)

    async for line in error_tail(
        events(), lambda info: _sse(openai_body(info)), where=f"a stream of {generations[0].model}"
    ):
        yield line
    yield b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _chat_chunks(
    generations: list[Generation],
    started: Started,
    completion_id: str,
    created: int,
    *,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[bytes]:
    def chunk(
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None,
        tokens: tuple[TokenLogprob, ...] = (),
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": chat_logprobs(tokens) if logprobs and tokens else None,
            "finish_reason": finish_reason,
        }
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": started.model,
            "choices": [choice],
        }

    def closing(finished: list[Finished]) -> list[dict[str, Any]]:
        if not include_usage:
            return []
        return [{**chunk(0, {}, None), "choices": [], "usage": choices_usage(started, finished)}]

    calls_sent = [0] * len(generations)  # per choice: each numbers its own calls

    def payloads(index: int, event: Piece) -> list[dict[str, Any]]:
        if isinstance(event, Finished):
            return [chunk(index, {}, finish_reason_of(event))]
        if isinstance(event, TextChunk):
            return [chunk(index, {"content": event.text}, None, event.logprobs)]
        if isinstance(event, ReasoningChunk):
            return [chunk(index, {"reasoning_content": event.text}, None)]
        number = calls_sent[index]
        calls_sent[index] += 1
        whole = _tool_call(event)
        arguments = whole["function"]["arguments"]
        whole["function"]["arguments"] = ""
        return [  # as OpenAI streams a call: its id and name first, then its arguments
            chunk(index, {"tool_calls": [{"index": number, **whole}]}, None),
            chunk(index, {"tool_calls": [{"index": number, "function": {"arguments": arguments}}]}, None),
        ]

    for index in range(len(generations)):
        yield _sse(chunk(index, {"role": "assistant", "content": ""}, None))
    async for line in sse_events(generations, payloads, closing):
        yield line


@post("/embeddings", status_code=200)
async def embeddings(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> dict[str, Any]:
    body = parse_body(EmbeddingBody, await request.body())
    inputs = body.inputs()
    vectors, tokens, _, model = await inference.embed(
        body.model,
        inputs,
        keep_alive=None,
        endpoint="/v1/embeddings",
        context=context,
        provider=named_provider(request),
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
    route_handlers=[list_models, retrieve_model, chat_completions, embeddings],
    exception_handlers=OPENAI_HANDLERS,
    tags=["openai"],
)
