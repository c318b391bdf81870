"""Inference as the APIs see it: chat, completion and embeddings on a named model.

The OpenAI and Ollama surfaces both call this. The router resolves the name and picks the
engine; the engine loads the model if needed, renders and tokenizes the prompt, and streams
events; this records the routing decision, token counts and timings. A service over the
engine: may import the engine's base, router and tool-call reader (``engine/tools.py``, pure),
metrics, the store's types and the egress types; never the web layer, never an engine
implementation (it talks to the ``Engine`` protocol), and never the egress component itself (it
calls providers through the ``EgressCalls`` protocol).

When the router sends a request to an external provider (``ExternalRouted``), the request is
built from what the client set (``engine/external.py``) and the egress streams the provider's
answer as the same events, its tool calls already read (``Ready.tool_format`` "native"). A local
engine whose queue is full before the request started (EngineBusy) hands it to an allowed
provider when policy allows one, with "the local queue ... is full" as the route's reason.

A model that thinks streams its reasoning block as ReasoningChunks, which pass by the tool-call
reader. When tools are offered, the answer is read as it streams (``ToolCallReader``, in the tool-call
format the engine reports for the model's template): text goes on as TextChunks, calls come out
as ToolCall events, and an answer that called tools finishes with reason "tool_calls".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from appliance.audit import Context
from appliance.egress.types import EgressCalls, Operation
from appliance.engine.base import (
    Embeddings,
    Finished,
    Prompt,
    Ready,
    ReasoningChunk,
    Route,
    SamplerOptions,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    ToolCall,
    ToolSet,
)
from appliance.engine.external import external_request
from appliance.engine.router import ExternalRouted, Routed, Router
from appliance.engine.routing import split_name
from appliance.engine.tools import ToolCallReader
from appliance.errors import (
    ApplianceError,
    EngineBusy,
    Forbidden,
    InvalidInput,
    NotReady,
    ProviderUnsupported,
)
from appliance.metrics import Metrics
from appliance.models.layers import ModelLayers
from appliance.names import ModelName
from appliance.store.base import InferenceRecord, Store

__all__ = ["Event", "GenerationOptions", "InferenceService", "Started"]


@dataclass(frozen=True)
class GenerationOptions(SamplerOptions):
    """A request's options; None (or empty) is unset: the model's own parameters, else the defaults."""

    max_tokens: int | None = None  # None: until the context is full
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    keep_alive: float | None = None
    context_length: int | None = None  # per sequence; None: the preference or setting
    tools: ToolSet | None = None  # offered to the model (engine/tools.py offer_tools); None: none
    think: bool | None = None  # the template's reasoning switch; None: the template's default
    context: tuple[int, ...] = ()  # token ids to go before the prompt (Ollama's context)
    return_context: bool = False  # Finished.context: the prompt's and the answer's token ids
    # Options holding a value the client's API implies (OpenAI's temperature 1), not one the client
    # sent: the local engine uses them; an external provider applies its own defaults instead.
    implied: frozenset[str] = frozenset()

    def under(self, parameters: dict[str, Any]) -> GenerationOptions:
        """These options, where unset taken from a model's parameters (its params layer)."""
        num_predict, seed = parameters.get("num_predict"), parameters.get("seed")
        return replace(
            self,
            max_tokens=self.max_tokens if self.max_tokens is not None else _positive(num_predict),
            temperature=_first(self.temperature, parameters.get("temperature")),
            top_p=_first(self.top_p, parameters.get("top_p")),
            top_k=_first(self.top_k, parameters.get("top_k")),
            seed=_first(self.seed, seed if seed is None or seed >= 0 else None),  # negative: random
            stop=self.stop or tuple(parameters.get("stop", ())),
            context_length=_first(self.context_length, parameters.get("num_ctx")),
        )

    def sampling(self) -> SamplingParams:
        # llama_cpp loads llama.cpp's libraries on import: not at start, only once a request needs them
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        grammar = None
        if self.tools is not None and self.tools.constrained and (self.json_mode or self.json_schema):
            raise InvalidInput(
                "a required tool call and a JSON response format cannot both constrain the answer",
                hint='leave response_format out, or use tool_choice "auto"',
            )
        if self.json_schema is not None:
            try:
                grammar = json_schema_to_gbnf(json.dumps(self.json_schema))
            except Exception as exc:  # the converter raises bare Exceptions for schemas it cannot express
                raise InvalidInput(f"the JSON schema cannot be enforced: {exc}") from exc
        elif self.json_mode:
            grammar = JSON_GBNF
        defaults = SamplingParams()
        return SamplingParams(
            **{option.name: getattr(self, option.name) for option in fields(SamplerOptions)},
            temperature=_first(self.temperature, defaults.temperature),
            top_p=_first(self.top_p, defaults.top_p),
            top_k=_first(self.top_k, defaults.top_k),
            grammar=grammar,
        )


T = TypeVar("T")


def _first(value: T | None, fallback: T) -> T:
    return fallback if value is None else value


def _positive(number: int | None) -> int | None:
    """Ollama's num_predict: -1 and -2 mean until the context is full."""
    return number if number is not None and number > 0 else None


@dataclass(frozen=True)
class Started:
    """First event of every stream: where it runs and how long the prompt is."""

    route: Route
    model: str
    prompt_tokens: int


@dataclass
class _Tracker:
    endpoint: str
    model: str
    correlation_id: str
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None


Event = Started | TextChunk | ReasoningChunk | ToolCall | Finished


class InferenceService:
    def __init__(
        self, router: Router, store: Store, metrics: Metrics, egress: EgressCalls | None = None
    ) -> None:
        self.router = router
        self.store = store
        self.metrics = metrics
        self.egress = egress  # external providers' calls; None: this process has no egress

    def history(self, *, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Served and refused requests, newest first: which engine served each and why
        (REQ-MODELS-0118). ``model`` is a local name ("tiny" means "tiny:latest") or, for a
        provider's, ``PROVIDER/MODEL`` as the log names it."""
        wanted = None if model is None else self._logged_name(model)
        return [record.__dict__ for record in self.store.list_inference(model=wanted, limit=limit)]

    def routable(self, name: str) -> None:
        """Raise what routing would refuse a chat with ``name`` with (blocking; nothing is
        recorded): a prompt task for a provider's model is checked when it is queued."""
        self.router.route(name)

    def _logged_name(self, model: str) -> str:
        directory = self.router.providers
        provider, _ = split_name(model, directory.list() if directory is not None else [])
        return model if provider is not None else str(ModelName.parse(model))

    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        options: GenerationOptions,
        *,
        endpoint: str,
        context: Context,
        provider: str | None = None,
    ) -> AsyncGenerator[Event]:
        """Events of a chat turn: Started, then TextChunks, ReasoningChunks (a model that thinks)
        and ToolCalls (when tools are offered), then Finished. Close it to stop early. ``context``
        says who asks (an external provider's allow-list reads it); ``provider`` is the
        X-Appliance-Provider header."""
        return self._stream(name, options, endpoint, context, provider=provider, messages=messages)

    def complete(
        self,
        name: str,
        prompt: str,
        options: GenerationOptions,
        *,
        endpoint: str,
        context: Context,
        provider: str | None = None,
        suffix: str | None = None,
        parse_special: bool = True,
    ) -> AsyncGenerator[Event]:
        """Events of a raw completion, as ``chat`` (never a ToolCall: no tools are offered). With
        a ``suffix``, the model fills in the middle between ``prompt`` and it; ``parse_special``
        False reads control tokens written in the text as plain text."""
        return self._stream(
            name,
            options,
            endpoint,
            context,
            provider=provider,
            prompt=prompt,
            suffix=suffix,
            parse_special=parse_special,
        )

    async def _stream(
        self,
        name: str,
        options: GenerationOptions,
        endpoint: str,
        context: Context,
        *,
        provider: str | None,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        suffix: str | None = None,
        parse_special: bool = True,
    ) -> AsyncGenerator[Event]:
        tracker = _Tracker(endpoint=endpoint, model=name, correlation_id=context.correlation_id)
        operation: Operation = "chat" if messages is not None else "complete"
        routed = await self._route(
            tracker, name, operation=operation, provider=provider, context_length=options.context_length
        )
        if isinstance(routed, Routed):
            local = self._local(
                tracker,
                routed,
                options,
                messages=messages,
                prompt=prompt,
                suffix=suffix,
                parse_special=parse_special,
            )
            async with aclosing(local):  # closing this stream cancels the request at once
                started: Event | None = None
                try:
                    started = await anext(local)
                    first = await anext(local)  # the engine took the request (or finished it at once)
                except EngineBusy as busy:
                    tried = started.route if isinstance(started, Started) else None
                    routed = await self._fallback(tracker, name, busy, tried, operation=operation)
                else:
                    yield started
                    yield first
                    async for event in local:
                        yield event
                    return
        outbound = self._external(
            tracker,
            routed,
            options,
            context,
            messages=messages,
            prompt=prompt,
            suffix=suffix,
        )
        async with aclosing(outbound):
            async for event in outbound:
                yield event

    async def _route(
        self,
        tracker: _Tracker,
        name: str,
        *,
        operation: Operation,
        provider: str | None,
        context_length: int | None = None,
    ) -> Routed | ExternalRouted:
        """The route for ``name``; a refusal is recorded with its reason (REQ-MODELS-0117, 0118)."""
        try:
            routed = await anyio.to_thread.run_sync(
                lambda: self.router.route(
                    name, context_length=context_length, provider=provider, operation=operation
                )
            )
        except ApplianceError as exc:
            await self._refused(tracker, exc)
            raise
        tracker.model = str(routed.name) if isinstance(routed, Routed) else _external_name(routed)
        return routed

    async def _fallback(
        self, tracker: _Tracker, name: str, busy: EngineBusy, local: Route | None, *, operation: Operation
    ) -> ExternalRouted:
        """The local queue is full before the request started: an external provider when policy
        allows one for ``name``, else the local refusal, recorded as the local engine's (once it
        had the model loaded, as any request that failed there)."""
        try:
            routed = await anyio.to_thread.run_sync(
                lambda: self.router.route(name, operation=operation, busy=busy)
            )
        except ApplianceError:
            if local is not None:
                tried = local
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        lambda: self._record(tracker, tried, Finished("error", 0, 0))
                    )
            raise
        assert isinstance(routed, ExternalRouted)
        tracker.model = _external_name(routed)
        return routed

    async def _local(
        self,
        tracker: _Tracker,
        routed: Routed,
        options: GenerationOptions,
        *,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        suffix: str | None,
        parse_special: bool,
    ) -> AsyncGenerator[Event]:
        """A local engine's (or a worker's) events; a full queue before the request started is
        raised unrecorded, for the caller to send it elsewhere or record it."""
        layers = routed.layers
        options = options.under(layers.parameters)
        request = Prompt(
            messages=None if messages is None else _with_layers(messages, layers),
            text=prompt,
            max_tokens=options.max_tokens,
            sampling=options.sampling(),
            stop=options.stop,
            keep_alive=options.keep_alive,
            tools=options.tools if messages is not None else None,
            suffix=suffix,
            parse_special=parse_special,
            think=options.think,
            context=options.context,
            return_context=options.return_context,
        )
        route: Route | None = None  # set once the engine has the model loaded
        answered = False  # an event past Ready came: the request is the engine's
        finished: Finished | None = None
        reader: ToolCallReader | None = None
        unsent: tuple[TokenLogprob, ...] = ()  # logprobs of text the tool-call reader still holds
        try:
            generation = routed.engine.generate(routed.spec, request)
            async with aclosing(generation):  # closing this stream cancels the request at once
                async for event in generation:
                    if isinstance(event, Ready):
                        route = routed.route(event.reason)
                        self.metrics.queue_depth.labels(model=tracker.model).set(event.queued)
                        if request.tools is not None and event.tool_format != "native":
                            reader = ToolCallReader(event.tool_format or "generic", request.tools)
                        yield Started(route=route, model=tracker.model, prompt_tokens=event.prompt_tokens)
                        continue
                    if isinstance(event, TextChunk | ReasoningChunk) and tracker.first_token is None:
                        tracker.first_token = time.monotonic()
                    if isinstance(event, Finished):
                        finished = event
                        if event.error is not None:
                            raise event.error  # as the first event: not answered (a full queue)
                    answered = True
                    if reader is None or isinstance(event, ReasoningChunk | ToolCall):
                        yield event  # tools are called in the answer; a native engine reads its own
                        continue
                    if isinstance(event, TextChunk):
                        parts, unsent = reader.feed(event.text), (*unsent, *event.logprobs)
                    else:
                        parts = reader.finish()
                    called = False
                    for part in parts:
                        called = called or isinstance(part, ToolCall)
                        if isinstance(part, str):
                            yield TextChunk(part, unsent)
                            unsent = ()
                        else:
                            yield part
                    if isinstance(event, Finished):
                        if unsent:  # the logprobs of the calls' own tokens, or of held text
                            yield TextChunk("", unsent)
                        if called and event.reason == "stop":
                            event = finished = replace(event, reason="tool_calls")
                        yield event
        except EngineBusy:
            if not answered:
                route = None  # not started: the caller sends it elsewhere, or records it
            elif finished is None:
                finished = Finished("error", 0, 0)
            raise
        except Exception:
            # The engine failed without a finished event (a worker's answer broke off): an error,
            # not a client that went away.
            if finished is None:
                finished = Finished("error", 0, 0)
            raise
        finally:
            if route is not None:  # a model that never loaded served nothing to log
                served = route
                with anyio.CancelScope(shield=True):  # a client that hung up still gets its request recorded
                    await anyio.to_thread.run_sync(lambda: self._record(tracker, served, finished))

    async def _external(
        self,
        tracker: _Tracker,
        routed: ExternalRouted,
        options: GenerationOptions,
        context: Context,
        *,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        suffix: str | None,
    ) -> AsyncGenerator[Event]:
        """An external provider's events, through the egress component (which checks its
        allow-lists, scrubs its key and audits the call); recorded here as any request is."""
        egress = self._egress()
        request = external_request(
            routed.model,
            options,
            provider=routed.provider.name,
            messages=messages,
            prompt=prompt,
            suffix=suffix,
        )
        call = egress.chat if messages is not None else egress.complete
        route = routed.route()
        finished: Finished | None = None
        try:
            events = call(routed.provider, request, context=context)
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, Ready):
                        yield Started(route=route, model=tracker.model, prompt_tokens=event.prompt_tokens)
                        continue
                    if isinstance(event, TextChunk | ReasoningChunk) and tracker.first_token is None:
                        tracker.first_token = time.monotonic()
                    if isinstance(event, Finished):
                        finished = event
                        if event.error is not None:
                            raise event.error
                    yield event
        except Exception as exc:
            if finished is None:  # refused by the egress's allow-lists, or the provider failed
                finished = Finished("refused" if isinstance(exc, Forbidden) else "error", 0, 0)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: self._record(tracker, route, finished))

    def _egress(self) -> EgressCalls:
        if self.egress is None:
            raise NotReady(
                "external providers are not reachable from this process",
                hint="ask the appliance server (appliance serve), which holds the providers' keys",
            )
        return self.egress

    async def embed(
        self,
        name: str,
        inputs: list[str],
        *,
        keep_alive: float | None,
        endpoint: str,
        context: Context,
        provider: str | None = None,
        truncate: bool = False,
        normalize: bool = False,
        dimensions: int | None = None,
        context_length: int | None = None,
    ) -> tuple[list[list[float]], int, Route, str]:
        """One vector per input. ``truncate`` cuts an input past the context instead of refusing
        it; ``normalize`` scales each vector to unit length (Ollama's /api/embed); ``dimensions``
        keeps the first N and normalizes again, as Ollama does. An external provider's vectors
        are cut and scaled here the same way."""
        tracker = _Tracker(endpoint=endpoint, model=name, correlation_id=context.correlation_id)
        routed = await self._route(
            tracker, name, operation="embed", provider=provider, context_length=context_length
        )
        if isinstance(routed, ExternalRouted):
            result, route = await self._embed_external(tracker, routed, inputs, context, context_length)
        else:
            result = await routed.engine.embed(routed.spec, inputs, keep_alive=keep_alive, truncate=truncate)
            route = routed.route(result.reason)
        vectors = result.vectors
        if dimensions is not None and vectors:
            size = len(vectors[0])
            if dimensions > size:
                raise InvalidInput(
                    f"dimensions {dimensions} is more than the {size} model {tracker.model} makes"
                )
            vectors = [vector[:dimensions] for vector in vectors]
        if normalize or dimensions is not None:
            vectors = [_unit(vector) for vector in vectors]
        if isinstance(routed, Routed):
            await anyio.to_thread.run_sync(
                lambda: self._record(tracker, route, Finished("stop", result.tokens, 0))
            )
        return vectors, result.tokens, route, tracker.model

    async def _embed_external(
        self,
        tracker: _Tracker,
        routed: ExternalRouted,
        inputs: list[str],
        context: Context,
        context_length: int | None,
    ) -> tuple[Embeddings, Route]:
        if context_length is not None:
            raise ProviderUnsupported(
                f"num_ctx is not supported by external provider {routed.provider.name} (the provider"
                " decides its context length)",
                hint="leave num_ctx out, or ask for a local model",
            )
        egress = self._egress()
        route = routed.route()
        finished = Finished("error", 0, 0)
        try:
            result = await egress.embed(routed.provider, routed.model, inputs, context=context)
            finished = Finished("stop", result.tokens, 0)
        except Forbidden:
            finished = Finished("refused", 0, 0)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: self._record(tracker, route, finished))
        return result, route

    async def _refused(self, tracker: _Tracker, error: ApplianceError) -> None:
        """A request routing refused, in the inference log with its reason (REQ-MODELS-0117)."""
        record = InferenceRecord(
            model=tracker.model,
            endpoint=tracker.endpoint,
            engine="",
            node="",
            reason=f"{error.code}: {error.message}",
            outcome="refused",
            prompt_tokens=0,
            completion_tokens=0,
            duration_ms=round((time.monotonic() - tracker.started) * 1000),
            correlation_id=tracker.correlation_id,
        )
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: self.store.append_inference(record))

    def _record(self, tracker: _Tracker, route: Route, finished: Finished | None) -> None:
        elapsed = time.monotonic() - tracker.started
        outcome = finished.reason if finished is not None else "cancelled"
        completion = finished.completion_tokens if finished is not None else 0
        self.metrics.observe_request(
            model=tracker.model,
            endpoint=tracker.endpoint,
            outcome=outcome,
            seconds=elapsed,
            completion_tokens=completion,
            prompt_tokens=finished.prompt_tokens if finished is not None else 0,
            cached_prompt_tokens=finished.cached_tokens if finished is not None else 0,
            first_token_seconds=(tracker.first_token - tracker.started) if tracker.first_token else None,
        )
        self.metrics.loaded_models.set(len(self.router.engine.loaded()))
        self.store.append_inference(
            InferenceRecord(
                model=tracker.model,
                endpoint=tracker.endpoint,
                engine=route.engine,
                node=route.node,
                reason=route.reason,
                outcome=outcome,
                prompt_tokens=finished.prompt_tokens if finished is not None else 0,
                completion_tokens=completion,
                duration_ms=round(elapsed * 1000),
                correlation_id=tracker.correlation_id,
            )
        )


def _external_name(routed: ExternalRouted) -> str:
    """A model an external provider serves, as the log and the answers name it."""
    return f"{routed.provider.name}/{routed.model}"


def _with_layers(messages: list[dict[str, Any]], layers: ModelLayers) -> list[dict[str, Any]]:
    """A created model's messages go first, and its system prompt leads a conversation without one
    (as Ollama does)."""
    conversation = [*layers.messages, *messages]
    if layers.system is not None and not (messages and messages[0].get("role") == "system"):
        conversation.insert(0, {"role": "system", "content": layers.system})
    return conversation


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm > 0 else vector
