"""What the rest of the appliance knows of external providers: ``Provider`` (never its key), the
``ExternalRequest`` a call carries, and the two seams: ``ProviderDirectory`` (what routing reads)
and ``EgressCalls`` (what the inference service calls). Imports: the engine's base, the audit
context and the store's row type.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, get_args

from appliance.audit import Context
from appliance.engine.base import Embeddings, EngineEvent, ToolCall, ToolSet
from appliance.store.base import Operation, Provider, ProviderKind

__all__ = [
    "KINDS",
    "OPERATIONS",
    "EgressCalls",
    "ExternalEvent",
    "ExternalRequest",
    "Operation",
    "Provider",
    "ProviderDirectory",
    "ProviderKind",
]

KINDS: tuple[ProviderKind, ...] = get_args(ProviderKind)
OPERATIONS: tuple[Operation, ...] = get_args(Operation)

# What an external call streams: the engine's events, and the tool calls the provider made itself
# (whole, with their arguments parsed), where a local engine's come out of its text.
ExternalEvent = EngineEvent | ToolCall


@dataclass(frozen=True)
class ExternalRequest:
    """One generation for a provider, in OpenAI chat terms; None (or empty) is unset, so the
    provider's own default applies. Fields a kind cannot honour are refused by its adapter."""

    model: str  # the provider's own model name
    messages: list[dict[str, Any]] | None = None  # OpenAI chat messages (tool_calls, tool results)
    prompt: str | None = None  # a raw completion (``complete``)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    tools: ToolSet | None = None
    logprobs: int | None = None  # as SamplerOptions.logprobs


class ProviderDirectory(Protocol):
    """The providers routing may pick from (``ProviderService`` implements it; cheap: per request)."""

    def list(self) -> list[Provider]: ...


class EgressCalls(Protocol):
    """The outbound calls the inference service makes (``Egress`` implements it). Each checks the
    provider's allow-lists for ``context.who`` and the operation, and records one log line, one
    audit row and the usage counters, whatever the outcome."""

    def chat(
        self, provider: Provider, request: ExternalRequest, *, context: Context
    ) -> AsyncGenerator[ExternalEvent]:
        """Ready (tool_format "native"), then TextChunks, ReasoningChunks and ToolCalls as the
        provider streams them, then Finished with its token counts; errors are raised."""
        ...

    def complete(
        self, provider: Provider, request: ExternalRequest, *, context: Context
    ) -> AsyncGenerator[ExternalEvent]:
        """As ``chat``, for a raw ``prompt`` (openai kind only)."""
        ...

    async def embed(
        self, provider: Provider, model: str, texts: list[str], *, context: Context
    ) -> Embeddings: ...

    def reachable(self, provider: Provider) -> bool:
        """Whether the provider answered its last probe (cached for ``egress.probe_every``); never
        blocks for long: the first call may probe."""
        ...
