"""The seam between inference and what runs it: the ``Engine`` protocol and the types it speaks.

An engine loads models from a ``LoadSpec`` (a blob digest and path, never a model name: the
router above resolves names) and streams generations and embeddings for resolved requests. The
in-process llama.cpp pool (``engine/pool.py``) is the first implementation; a remote worker is
the next. May import ``appliance.errors`` and the standard library only, so anything can depend
on it without loading llama.cpp.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import ApplianceError

__all__ = [
    "Embeddings",
    "Engine",
    "EngineEvent",
    "Finished",
    "LoadSpec",
    "LoadedInfo",
    "Prompt",
    "Ready",
    "ReasoningChunk",
    "Route",
    "SamplerOptions",
    "SamplingParams",
    "TextChunk",
    "TokenLogprob",
    "ToolCall",
    "ToolSet",
]


@dataclass(frozen=True)
class LoadSpec:
    """What to load and how: everything an engine needs, with no registry behind it."""

    key: str  # what the loaded copy is listed and unloaded by (the router uses the model's name)
    digest: str  # the GGUF blob; another digest under the same key is a replaced file
    path: Path
    size_bytes: int
    context_length: int  # tokens per sequence, already capped at the model's own
    context_requested: bool = False  # asked for by the request: an idle copy with another is reloaded
    n_gpu_layers: int | None = None  # None: all layers when the build can offload, else none
    capabilities: dict[str, Any] = field(default_factory=dict)  # GGUF metadata, for memory estimates
    chat_template: str | None = None  # Jinja in place of the GGUF's own (a created model's template)


@dataclass(frozen=True)
class Route:
    """Which engine serves a request, on which node, and why (REQ-MODELS-0118)."""

    engine: str
    node: str
    reason: str


@dataclass(frozen=True)
class SamplerOptions:
    """The samplers a request sets as they are, with the values that leave a sampler out (Ollama's
    defaults): the engine's SamplingParams and the service's GenerationOptions both carry them."""

    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # tokens the penalties look back over; -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0  # 1 or 2: Mirostat (v1, v2) replaces top-k/top-p/min-p/typical
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    # Not a sampler: how many alternatives each token's logprob comes with. None computes no
    # logprobs at all (they cost a log-softmax over the vocabulary per token); 0: the chosen token's.
    logprobs: int | None = None


@dataclass(frozen=True)
class SamplingParams(SamplerOptions):
    """llama.cpp's samplers, with the values that leave a sampler out (Ollama's defaults)."""

    # A request may leave these to the model's parameters (GenerationOptions holds them unset).
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    grammar: str | None = None  # GBNF, e.g. to force JSON


@dataclass(frozen=True)
class ToolSet:
    """The tools offered to the model for one request, as OpenAI function tools
    (``{"type": "function", "function": {"name", "description", "parameters"}}``)."""

    tools: tuple[dict[str, Any], ...]
    required: bool = False  # the answer must be a tool call (decoding is constrained to one)
    function: str | None = None  # the one function the answer must call
    parallel: bool = True  # False: at most one call per answer

    @property
    def constrained(self) -> bool:
        return self.required or self.function is not None


@dataclass(frozen=True)
class ToolCall:
    """A tool call read back from the model's answer."""

    id: str  # "call_…"
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Prompt:
    """A resolved generation request: a conversation (rendered with the model's template) or raw text."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    max_tokens: int | None = None  # None: until the context is full
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    keep_alive: float | None = None  # None: the engine's setting
    tools: ToolSet | None = None  # rendered through the chat template; None: no tools offered
    suffix: str | None = None  # fill in the middle: ``text`` is the prefix, built with the FIM tokens
    parse_special: bool = True  # a raw prompt may write control tokens as text; False reads them as text
    think: bool | None = None  # the template's reasoning switch (enable_thinking); None: its default
    context: tuple[int, ...] = ()  # token ids that go before the prompt (an earlier answer's context)
    return_context: bool = False  # Finished.context holds the prompt's and the answer's token ids


@dataclass(frozen=True)
class Ready:
    """First event of a generation: the model is loaded and the prompt is queued."""

    reason: str  # how the model came to be loaded ("the model was already loaded", ...)
    prompt_tokens: int
    queued: int  # requests waiting for this model, this one included
    tool_format: str = ""  # how the answer writes tool calls (engine/tools.py FORMATS); "": none offered


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution (before temperature
    and the sampler's truncation, as llama.cpp's server reports it), with the likeliest tokens."""

    token: str  # its text; a piece of a multi-byte character reads as U+FFFD (``bytes`` holds it)
    logprob: float
    bytes: bytes
    top: tuple[TokenLogprob, ...] = ()  # most likely first; empty for the alternatives themselves


@dataclass(frozen=True)
class TextChunk:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this text completes, when asked for


@dataclass(frozen=True)
class ReasoningChunk:
    """Text of the model's reasoning block (``<think>…</think>``), split out of the answer."""

    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop", "length", "tool_calls" (the answer called tools), "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: ApplianceError | None = None
    context: tuple[int, ...] = ()  # prompt and answer token ids, when the Prompt asked for them
    stop_sequence: str | None = None  # the stop string that ended it, when one did
    cached_tokens: int = 0  # prompt tokens taken from an earlier request's KV cache, not decoded again


EngineEvent = Ready | TextChunk | ReasoningChunk | Finished


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    tokens: int
    reason: str  # as Ready.reason


@dataclass(frozen=True)
class LoadedInfo:
    """A loaded model as ``ps`` shows it."""

    key: str
    digest: str
    size_bytes: int
    memory_bytes: int
    context_length: int
    gpu_layers: int
    parallel: int  # requests it decodes together
    active_requests: int
    queued_requests: int
    loaded_at: float  # wall clock
    expires_in: float | None  # seconds; None while serving or kept for good
    capabilities: dict[str, Any]


class Engine(Protocol):
    """Runs models. Blocking methods are called from worker threads, never on the event loop."""

    name: str  # "local:llama.cpp"
    node: str  # where it runs: "local" for the in-process engine

    @property
    def memory_budget(self) -> int: ...

    @property
    def gpu_offload(self) -> bool: ...

    def generate(self, spec: LoadSpec, prompt: Prompt) -> AsyncGenerator[EngineEvent]:
        """Ready, then TextChunks, then Finished (an error ends it with an exception). Closing the
        iterator early cancels the request and frees its slot."""
        ...

    async def embed(
        self, spec: LoadSpec, texts: list[str], *, keep_alive: float | None, truncate: bool = False
    ) -> Embeddings:
        """One vector per text; a text past the context is cut to fit when ``truncate``, else refused."""
        ...

    def load(self, spec: LoadSpec, *, keep_alive: float | None) -> tuple[LoadedInfo, str]:
        """Load now (blocking); the loaded model and how it came to be loaded."""
        ...

    def loaded(self) -> list[LoadedInfo]: ...

    def unload(self, key: str) -> bool:
        """Unload now (blocking); requests in flight on it end with an error. False when not loaded."""
        ...

    def unload_when_idle(self, key: str) -> None:
        """Unload at once if nothing runs on it; else leave it to expire when its requests end."""
        ...

    def retire(self, key: str) -> None:
        """The model is gone: unlist it at once, let requests in flight finish, then unload it."""
        ...

    def close(self) -> None: ...
