"""MCP tools: inference. ``chat`` and ``embed`` on a named model, through the same inference
service (and so the same router) as ``/v1``: a local engine, a worker or an allowed external
provider serves it, and the inference log records it under the endpoints ``mcp.chat`` and
``mcp.embed``. The answer says which engine served it and why.

A process without an engine (the CLI) has no inference service: the tools refuse there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from appliance.engine.base import Finished, Route, TextChunk
from appliance.errors import NotReady
from appliance.mcp.limits import fit_list, fit_text
from appliance.mcp.types import Tool, ToolCall, ToolInput, ToolOutput

if TYPE_CHECKING:
    from appliance.engine.service import InferenceService

__all__ = ["TOOLS", "ChatIn", "ChatOut", "EmbedIn", "EmbedOut"]

CHAT_ENDPOINT = "mcp.chat"
EMBED_ENDPOINT = "mcp.embed"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatIn(ToolInput):
    model: str = Field(min_length=1, description="The model's name: a local one, or PROVIDER/MODEL.")
    messages: list[Message] = Field(min_length=1, description="The conversation so far, oldest first.")
    max_tokens: int | None = Field(default=None, ge=1, description="The most tokens to answer with.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
    seed: int | None = Field(default=None, ge=0, description="The sampler's seed, for a repeatable answer.")


class Engine(BaseModel):
    """Which engine served the request, on which node, and why the router picked it."""

    engine: str
    node: str
    reason: str

    @classmethod
    def of(cls, route: Route) -> Engine:
        return cls(engine=route.engine, node=route.node, reason=route.reason)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ChatOut(ToolOutput):
    model: str = Field(description="The model that answered, by its full name.")
    text: str = Field(description="The answer.")
    finish_reason: str = Field(description="stop, length or cancelled.")
    usage: Usage
    served_by: Engine


class EmbedIn(ToolInput):
    model: str = Field(min_length=1, description="The embedding model's name.")
    input: list[str] = Field(min_length=1, description="The texts to embed, one vector each.")


class EmbedOut(ToolOutput):
    model: str
    vectors: list[list[float]] = Field(
        description="One vector per input, in order; when truncated, the trailing ones were left out."
    )
    prompt_tokens: int
    served_by: Engine


def _inference(call: ToolCall) -> InferenceService:
    if call.runtime.inference is None:
        raise NotReady(
            "this process serves no models: inference tools run in the appliance server",
            hint="call the tool through the server's /mcp (appliance serve)",
        )
    return call.runtime.inference


async def chat(call: ToolCall, arguments: ChatIn) -> ChatOut:
    # Imported here: the engine's service is only worth loading where a model is asked for.
    from appliance.engine.service import GenerationOptions, Started

    inference = _inference(call)
    options = GenerationOptions(
        max_tokens=arguments.max_tokens, temperature=arguments.temperature, seed=arguments.seed
    )
    messages: list[dict[str, Any]] = [message.model_dump() for message in arguments.messages]
    stream = inference.chat(arguments.model, messages, options, endpoint=CHAT_ENDPOINT, context=call.context)
    parts: list[str] = []
    started: Started | None = None
    finished: Finished | None = None
    try:
        async for event in stream:
            if isinstance(event, Started):
                started = event
            elif isinstance(event, TextChunk):
                parts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    finally:
        await stream.aclose()
    # The service raises a failure itself; a stream always starts and finishes otherwise.
    assert started is not None
    assert finished is not None
    return ChatOut(
        model=started.model,
        text="".join(parts),
        finish_reason=finished.reason,
        usage=Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens),
        served_by=Engine.of(started.route),
    )


async def embed(call: ToolCall, arguments: EmbedIn) -> EmbedOut:
    inference = _inference(call)
    vectors, tokens, route, model = await inference.embed(
        arguments.model, arguments.input, keep_alive=None, endpoint=EMBED_ENDPOINT, context=call.context
    )
    return EmbedOut(model=model, vectors=vectors, prompt_tokens=tokens, served_by=Engine.of(route))


def _fit_chat(output: ChatOut, limit: int) -> ChatOut:
    return fit_text(output, "text", limit)


def _fit_embed(output: EmbedOut, limit: int) -> EmbedOut:
    # Whole vectors only: a cut vector would be a wrong one, not a shorter one.
    return fit_list(output, "vectors", limit)


TOOLS: list[Tool[Any, Any]] = [
    Tool(
        name="chat",
        title="Chat with a model",
        description="Send a conversation to a named model and get its answer, the tokens used and "
        "which engine served it (the local engine, a worker or an allowed external provider).",
        input=ChatIn,
        output=ChatOut,
        run=chat,
        fit=_fit_chat,
    ),
    Tool(
        name="embed",
        title="Embed texts",
        description="Turn texts into vectors with a named embedding model, one vector per text.",
        input=EmbedIn,
        output=EmbedOut,
        run=embed,
        fit=_fit_embed,
    ),
]
