"""The in-process engine: a pool of llama.cpp models loaded from the cache (mmap, no copy), kept
alive, unloaded least recently used first to fit a memory budget. It implements ``Engine``.

Models are loaded from a ``LoadSpec`` and listed by its ``key``; the pool never resolves a
name, reads a preference or records use (the router above does). A model is loaded on first use
(or by ``load``) and stays loaded for ``keep_alive`` after its last request ends (Ollama's
semantics: 0 unloads at once, negative keeps it for good). When a model does not fit the memory
budget, idle models are unloaded least recently used first; models serving requests are never
unloaded under them.

A retired model (deleted from the registry) leaves the pool at once (``loaded`` no longer lists
it, no new request reaches it), requests in flight on it finish (its blob stays readable through
the memory map even once unlinked), and the last one to end unloads it.

May import ``appliance.engine`` (base, llama, batcher, chat, prompts), ``appliance.hostinfo``,
``appliance.errors`` and ``appliance.settings``; never the registry, the store or the web layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from appliance import hostinfo
from appliance.bridge import LoopInbox
from appliance.engine.base import (
    Embeddings,
    EngineEvent,
    Finished,
    LoadedInfo,
    LoadSpec,
    Prompt,
    Ready,
    SamplingParams,
    TextChunk,
)
from appliance.engine.chat import ChatTemplate
from appliance.engine.sizing import machine_parallel, machine_threads
from appliance.errors import EngineFailure, InsufficientMemory, PromptTooLong
from appliance.settings import EngineSettings

# llama.cpp's libraries load when the first model does, not while the server starts (0.2 s of it).
if TYPE_CHECKING:
    from appliance.engine.batcher import Batcher, Event
    from appliance.engine.llama import LlamaContext, LlamaModel

__all__ = ["ENGINE_NAME", "EnginePool", "LoadedModel", "estimate_memory"]

ENGINE_NAME = "local:llama.cpp"
_COMPUTE_OVERHEAD = 64 * 1024 * 1024

ALREADY_LOADED = "the model was already loaded"
LOADED_ON_DEMAND = "loaded from the local cache on demand"
FILE_REPLACED = "reloaded: the model's file was replaced"


@dataclass
class LoadedModel:
    key: str
    digest: str
    size_bytes: int
    memory_bytes: int
    seq_ctx: int
    n_seq: int
    gpu_layers: int
    model: LlamaModel
    context: LlamaContext
    batcher: Batcher
    template: ChatTemplate
    capabilities: dict[str, Any]
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # monotonic; None keeps it loaded
    in_use: int = 0
    retired: bool = False  # deleted: unloaded when its last request ends
    expire_when_idle: bool = False  # asked to unload while busy: the last request's end unloads it
    embed_lock: threading.Lock = field(default_factory=threading.Lock)
    embedder: LlamaContext | None = None

    def tokenize(self, text: str) -> list[int]:
        add_bos = not text.startswith(self.template.bos_token) if self.template.bos_token else True
        return self.model.tokenize(text, add_special=add_bos)

    def info(self) -> LoadedInfo:
        expires_in = None if self.expires_at is None else max(0.0, self.expires_at - time.monotonic())
        return LoadedInfo(
            key=self.key,
            digest=self.digest,
            size_bytes=self.size_bytes,
            memory_bytes=self.memory_bytes,
            context_length=self.seq_ctx,
            gpu_layers=self.gpu_layers,
            parallel=self.n_seq,
            active_requests=self.batcher.active,
            queued_requests=self.batcher.queued,
            loaded_at=self.loaded_at,
            expires_in=expires_in,
            capabilities=self.capabilities,
        )

    def close(self) -> None:
        self.context.close()
        if self.embedder is not None:
            self.embedder.close()
        self.model.close()


def fit_parallel(
    wanted: int, capabilities: dict[str, Any], *, weights: int, seq_ctx: int, budget: int
) -> int:
    """At most ``wanted`` sequences whose KV cache takes at most half of what the budget leaves
    beside the weights (the other half stays for another model); at least one."""
    room = (budget - estimate_memory(capabilities, weights=weights, n_ctx=0)) // 2
    per_sequence = estimate_memory(capabilities, weights=0, n_ctx=seq_ctx) - _COMPUTE_OVERHEAD
    if per_sequence <= 0:
        return wanted
    return max(1, min(wanted, room // per_sequence))


def estimate_memory(capabilities: dict[str, Any], *, weights: int, n_ctx: int) -> int:
    """Weights (mapped whole) + an f16 KV cache for ``n_ctx`` tokens + compute buffers."""
    layers = int(capabilities.get("block_count", 0))
    embedding = int(capabilities.get("embedding_length", 0))
    heads = int(capabilities.get("head_count", 1)) or 1
    kv_heads = int(capabilities.get("head_count_kv", heads)) or heads
    kv_cache = 2 * layers * n_ctx * (embedding // heads) * kv_heads * 2
    return weights + kv_cache + _COMPUTE_OVERHEAD


class EnginePool:
    name = ENGINE_NAME
    node = "local"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.budget = settings.memory_budget or int((hostinfo.memory().total_bytes or 0) * 0.75)
        self._loaded: dict[str, LoadedModel] = {}
        self._retired: list[LoadedModel] = []  # deleted, still serving: their memory is still held
        self._lock = threading.RLock()  # guards _loaded, _retired, in_use counts and expiry flags
        self._load_locks: dict[str, threading.Lock] = {}
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="model-reaper", daemon=True)
        self._reaper.start()

    @property
    def memory_budget(self) -> int:
        return self.budget

    @property
    def gpu_offload(self) -> bool:
        from appliance.engine.llama import gpu_offload_supported

        return gpu_offload_supported()

    # -- loading -------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedInfo]:
        with self._lock:
            return [loaded.info() for loaded in sorted(self._loaded.values(), key=lambda it: it.key)]

    def acquire(self, spec: LoadSpec) -> tuple[LoadedModel, str]:
        """The loaded model for ``spec`` (loading it if needed), held until ``release``; and why.

        An idle model loaded from another digest (its file was replaced) is reloaded; so is one
        with another context when the request asked for one, as Ollama does for ``num_ctx``. One
        that is serving requests keeps its context, since reloading would cut those requests off.
        """

        def reload_needed(loaded: LoadedModel) -> bool:
            idle = loaded.in_use == 0 and loaded.batcher.idle
            replaced = loaded.digest != spec.digest
            resized = spec.context_requested and loaded.seq_ctx != spec.context_length
            return idle and (replaced or resized)

        with self._lock:
            loaded = self._loaded.get(spec.key)
            if loaded is not None and not reload_needed(loaded):
                self._hold(loaded)
                return loaded, ALREADY_LOADED
            load_lock = self._load_locks.setdefault(spec.key, threading.Lock())
        with load_lock:  # one load per model, however many requests arrive at once
            with self._lock:
                loaded = self._loaded.get(spec.key)
                reload = loaded is not None and reload_needed(loaded)
                file_replaced = reload and loaded is not None and loaded.digest != spec.digest
                fresh = loaded is None
                if reload:
                    del self._loaded[spec.key]
            if loaded is None or reload:
                if loaded is not None:
                    self._close(loaded)
                loaded = self._load(spec)
            with self._lock:
                self._loaded[spec.key] = loaded
                self._hold(loaded)
        if file_replaced:
            reason = FILE_REPLACED
        elif reload:
            reason = f"reloaded with the requested context of {spec.context_length} tokens"
        elif fresh:
            reason = LOADED_ON_DEMAND
        else:
            reason = ALREADY_LOADED
        return loaded, reason

    def _hold(self, loaded: LoadedModel) -> None:
        loaded.in_use += 1
        loaded.expires_at = None

    def release(self, loaded: LoadedModel, *, keep_alive: float | None = None) -> None:
        keep = self.settings.keep_alive if keep_alive is None else keep_alive
        with self._lock:
            loaded.in_use -= 1
            loaded.last_used = time.monotonic()
            if loaded.in_use == 0 and loaded.expire_when_idle:
                keep, loaded.expire_when_idle = 0, False
            if loaded.in_use == 0:
                loaded.expires_at = None if keep < 0 else loaded.last_used + keep
            finished_retired = loaded.retired and loaded.in_use == 0
            if finished_retired:
                self._retired.remove(loaded)
        if finished_retired:
            self._close(loaded)
        elif keep == 0:
            self._reap()

    def load(self, spec: LoadSpec, *, keep_alive: float | None = None) -> tuple[LoadedInfo, str]:
        loaded, reason = self.acquire(spec)
        info = loaded.info()
        self.release(loaded, keep_alive=keep_alive)
        return info, reason

    def unload(self, key: str) -> bool:
        with self._lock:
            loaded = self._loaded.pop(key, None)
        if loaded is None:
            return False
        self._close(loaded)
        return True

    def unload_when_idle(self, key: str) -> None:
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                return
            if loaded.in_use > 0:
                loaded.expire_when_idle = True
                return
            loaded.expires_at = time.monotonic()
        self._reap()

    def retire(self, key: str) -> None:
        with self._lock:
            loaded = self._loaded.pop(key, None)
            idle = loaded is not None and loaded.in_use == 0
            if loaded is not None and not idle:
                loaded.retired = True
                self._retired.append(loaded)
        if loaded is not None and idle:
            self._close(loaded)

    def _load(self, spec: LoadSpec) -> LoadedModel:
        from appliance.engine.batcher import Batcher
        from appliance.engine.llama import LlamaContext, LlamaModel, gpu_offload_supported

        gpu_layers = spec.n_gpu_layers
        if gpu_layers is None:
            gpu_layers = -1 if gpu_offload_supported() else 0
        n_seq = self.settings.parallel or fit_parallel(
            machine_parallel(gpu_offload=gpu_layers != 0),
            spec.capabilities,
            weights=spec.size_bytes,
            seq_ctx=spec.context_length,
            budget=self.budget,
        )
        memory = estimate_memory(
            spec.capabilities, weights=spec.size_bytes, n_ctx=spec.context_length * n_seq
        )
        self._make_room(memory, spec.key)
        threads = self.settings.threads or machine_threads()
        llama_model = LlamaModel(spec.path, n_gpu_layers=gpu_layers)
        seq_ctx = spec.context_length
        try:
            context = LlamaContext(
                llama_model, n_ctx=seq_ctx * n_seq, n_seq=n_seq, n_batch=max(512, seq_ctx), threads=threads
            )
        except BaseException:
            llama_model.close()
            raise
        batcher = Batcher(
            llama_model,
            context,
            n_seq=n_seq,
            seq_ctx=seq_ctx,
            queue_size=self.settings.queue_size,
            reuse_prompts=self.settings.prompt_reuse,
        )
        template = ChatTemplate(
            spec.chat_template or llama_model.chat_template(),
            bos_token=llama_model.token_text(llama_model.bos) if llama_model.bos >= 0 else "",
            eos_token=llama_model.token_text(llama_model.eos) if llama_model.eos >= 0 else "",
        )
        return LoadedModel(
            key=spec.key,
            digest=spec.digest,
            size_bytes=spec.size_bytes,
            memory_bytes=memory,
            seq_ctx=seq_ctx,
            n_seq=n_seq,
            gpu_layers=gpu_layers,
            model=llama_model,
            context=context,
            batcher=batcher,
            template=template,
            capabilities=spec.capabilities,
        )

    def _make_room(self, needed: int, incoming: str) -> None:
        if needed > self.budget:
            raise InsufficientMemory(
                f"model {incoming} needs about {needed} bytes; the engine's budget is {self.budget}"
            )
        while True:
            with self._lock:
                used = sum(loaded.memory_bytes for loaded in (*self._loaded.values(), *self._retired))
                if used + needed <= self.budget:
                    return
                idle = [
                    loaded for loaded in self._loaded.values() if loaded.in_use == 0 and loaded.batcher.idle
                ]
                if not idle:
                    raise InsufficientMemory(
                        f"model {incoming} needs about {needed} bytes; {used} of {self.budget} are held by"
                        " models that are serving requests"
                    )
                victim = min(idle, key=lambda loaded: loaded.last_used)
                del self._loaded[victim.key]
            self._close(victim)

    def _close(self, loaded: LoadedModel) -> None:
        loaded.batcher.stop(EngineFailure(f"model {loaded.key} was unloaded"))
        loaded.close()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [
                loaded
                for loaded in self._loaded.values()
                if loaded.in_use == 0 and loaded.expires_at is not None and loaded.expires_at <= now
            ]
            for loaded in expired:
                del self._loaded[loaded.key]
        for loaded in expired:
            self._close(loaded)

    def _reap_forever(self) -> None:
        while not self._closing.wait(timeout=0.5):
            self._reap()

    def close(self) -> None:
        self._closing.set()
        self._reaper.join()
        with self._lock:
            everything = [*self._loaded.values(), *self._retired]
            self._loaded.clear()
            self._retired.clear()
        for loaded in everything:
            self._close(loaded)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, spec: LoadSpec, prompt: Prompt) -> AsyncGenerator[EngineEvent]:
        """Ready, then the request's events (see ``Engine.generate``): the answer's reasoning
        block, when the template has one, comes as ReasoningChunks, the rest as TextChunks."""
        from appliance.engine.prompts import build_prompt

        loaded, reason = await anyio.to_thread.run_sync(lambda: self.acquire(spec))
        try:
            built = build_prompt(loaded.model, loaded.template, prompt)
            max_tokens = prompt.max_tokens if prompt.max_tokens is not None else loaded.seq_ctx
            yield Ready(
                reason=reason,
                prompt_tokens=len(built.tokens),
                queued=loaded.batcher.queued,
                tool_format=built.tool_format,
            )
            stream = self.stream_tokens(
                loaded, built.tokens, max_tokens=max_tokens, sampling=built.sampling, stop=built.stop
            )
            answer: list[str] = []  # the model's own text, markup included, for the context
            async with aclosing(stream):
                async for event in stream:
                    if isinstance(event, TextChunk):
                        if prompt.return_context:
                            answer.append(event.text)
                        if built.splitter is not None:
                            for part in built.splitter.feed(event.text):
                                yield part
                            continue
                    elif isinstance(event, Finished):
                        if built.splitter is not None:
                            for part in built.splitter.finish():
                                yield part
                        if prompt.return_context:
                            context = built.answer_context(
                                loaded.model, loaded.template, prompt, "".join(answer)
                            )
                            event = replace(event, context=context)
                    yield event
        finally:
            self.release(loaded, keep_alive=prompt.keep_alive)

    async def stream_tokens(
        self,
        loaded: LoadedModel,
        prompt: list[int],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
    ) -> AsyncGenerator[Event]:
        """Stream events for one tokenized request; closing the iterator early frees its sequence."""
        from appliance.engine.batcher import GenerationRequest

        events: LoopInbox[Event] = LoopInbox()

        def emit(event: Event) -> None:
            if not events.put(event):  # the event loop is gone (shutdown); nobody is listening
                request.cancelled.set()

        request = GenerationRequest(
            prompt=prompt, max_tokens=max_tokens, sampling=sampling, emit=emit, stop=stop
        )
        loaded.batcher.submit(request)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            request.cancelled.set()
            loaded.batcher.wake()

    async def embed(
        self, spec: LoadSpec, texts: list[str], *, keep_alive: float | None, truncate: bool = False
    ) -> Embeddings:
        loaded, reason = await anyio.to_thread.run_sync(lambda: self.acquire(spec))
        try:
            vectors, tokens = await anyio.to_thread.run_sync(
                lambda: self.embed_loaded(loaded, texts, truncate=truncate)
            )
        finally:
            self.release(loaded, keep_alive=keep_alive)
        return Embeddings(vectors=vectors, tokens=tokens, reason=reason)

    def embed_loaded(
        self, loaded: LoadedModel, texts: list[str], *, truncate: bool = False
    ) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings, one input at a time on a context of their own (blocking). An
        input longer than the context is cut to fit when ``truncate``, else refused."""
        from appliance.engine.llama import LlamaContext

        vectors: list[list[float]] = []
        tokens_used = 0
        with loaded.embed_lock:
            if loaded.embedder is None:
                loaded.embedder = LlamaContext(
                    loaded.model,
                    n_ctx=loaded.seq_ctx,
                    n_seq=1,
                    n_batch=loaded.seq_ctx,
                    threads=self.settings.threads or machine_threads(),
                    embeddings=True,
                )
            for text in texts:
                tokens = loaded.tokenize(text)
                if truncate:
                    tokens = tokens[: loaded.seq_ctx]
                if len(tokens) > loaded.seq_ctx:
                    raise PromptTooLong(
                        f"an input has {len(tokens)} tokens; this model's context holds {loaded.seq_ctx}"
                    )
                loaded.embedder.forget(0)
                loaded.embedder.decode([(token, index, 0, True) for index, token in enumerate(tokens)])
                vectors.append(loaded.embedder.sequence_embedding(0, loaded.model.n_embd))
                tokens_used += len(tokens)
        return vectors, tokens_used
