"""Inference as the APIs see it: chat, completion and embeddings on a named model.

The OpenAI and Ollama surfaces both call this; it acquires the model from the pool (loading
it if needed), streams events, and records the routing decision, token counts and timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from appliance.engine.batcher import Finished, TextChunk
from appliance.engine.llama import SamplingParams
from appliance.engine.pool import EnginePool, Route
from appliance.errors import InvalidInput
from appliance.metrics import Metrics
from appliance.names import ModelName
from appliance.store.base import InferenceRecord, Store

__all__ = ["GenerationOptions", "InferenceService", "Started"]


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    keep_alive: float | None = None
    context_length: int | None = None  # per sequence; None: the preference or setting

    def sampling(self) -> SamplingParams:
        grammar = None
        if self.json_schema is not None:
            try:
                grammar = json_schema_to_gbnf(json.dumps(self.json_schema))
            except Exception as exc:  # the converter raises bare Exceptions for schemas it cannot express
                raise InvalidInput(f"the JSON schema cannot be enforced: {exc}") from exc
        elif self.json_mode:
            grammar = JSON_GBNF
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed, grammar=grammar
        )


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


class InferenceService:
    def __init__(self, pool: EnginePool, store: Store, metrics: Metrics) -> None:
        self.pool = pool
        self.store = store
        self.metrics = metrics

    def history(self, *, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Served requests, newest first: which engine served each and why (REQ-MODELS-0118)."""
        wanted = None if model is None else str(ModelName.parse(model))  # "tiny" means "tiny:latest"
        return [record.__dict__ for record in self.store.list_inference(model=wanted, limit=limit)]

    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        options: GenerationOptions,
        *,
        endpoint: str,
        correlation_id: str,
    ) -> AsyncGenerator[Started | TextChunk | Finished]:
        """Events of a chat turn: Started, then TextChunks, then Finished. Close it to stop early."""
        return self._stream(name, options, endpoint, correlation_id, messages=messages)

    def complete(
        self, name: str, prompt: str, options: GenerationOptions, *, endpoint: str, correlation_id: str
    ) -> AsyncGenerator[Started | TextChunk | Finished]:
        """Events of a raw completion, as ``chat``."""
        return self._stream(name, options, endpoint, correlation_id, prompt=prompt)

    async def _stream(
        self,
        name: str,
        options: GenerationOptions,
        endpoint: str,
        correlation_id: str,
        *,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
    ) -> AsyncGenerator[Started | TextChunk | Finished]:
        tracker = _Tracker(endpoint=endpoint, model=name, correlation_id=correlation_id)
        sampling = options.sampling()
        loaded, route = await anyio.to_thread.run_sync(
            lambda: self.pool.acquire(name, context_length=options.context_length)
        )
        tracker.model = str(loaded.name)
        finished: Finished | None = None
        try:
            text = loaded.template.render(messages) if messages is not None else (prompt or "")
            tokens = loaded.tokenize(text)
            stop = (*options.stop, *loaded.template.stop_strings) if messages is not None else options.stop
            max_tokens = options.max_tokens if options.max_tokens is not None else loaded.seq_ctx
            yield Started(route=route, model=str(loaded.name), prompt_tokens=len(tokens))
            self.metrics.queue_depth.labels(model=tracker.model).set(loaded.batcher.queued)
            generation = self.pool.generate(
                loaded, tokens, max_tokens=max_tokens, sampling=sampling, stop=stop
            )
            async with aclosing(generation):  # closing this stream cancels the request at once
                async for event in generation:
                    if isinstance(event, TextChunk) and tracker.first_token is None:
                        tracker.first_token = time.monotonic()
                    if isinstance(event, Finished):
                        finished = event
                        if event.error is not None:
                            raise event.error
                    yield event
        finally:
            self.pool.release(loaded, keep_alive=options.keep_alive)
            with anyio.CancelScope(shield=True):  # a client that hung up still gets its request recorded
                await anyio.to_thread.run_sync(lambda: self._record(tracker, route, finished))

    async def embed(
        self, name: str, inputs: list[str], *, keep_alive: float | None, endpoint: str, correlation_id: str
    ) -> tuple[list[list[float]], int, Route, str]:
        tracker = _Tracker(endpoint=endpoint, model=name, correlation_id=correlation_id)
        loaded, route = await anyio.to_thread.run_sync(lambda: self.pool.acquire(name))
        tracker.model = str(loaded.name)
        try:
            vectors, tokens = await anyio.to_thread.run_sync(lambda: self.pool.embed(loaded, inputs))
        finally:
            self.pool.release(loaded, keep_alive=keep_alive)
        await anyio.to_thread.run_sync(lambda: self._record(tracker, route, Finished("stop", tokens, 0)))
        return vectors, tokens, route, str(loaded.name)

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
            first_token_seconds=(tracker.first_token - tracker.started) if tracker.first_token else None,
        )
        self.metrics.loaded_models.set(len(self.pool.loaded()))
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
