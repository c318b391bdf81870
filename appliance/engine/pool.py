"""The pool of loaded models: load from the cache (mmap, no copy), keep alive, unload LRU to fit a budget.

A model is loaded on first use (or by ``load``) and stays loaded for ``keep_alive`` after its
last request ends (Ollama's semantics: 0 unloads at once, negative keeps it for good). When a
model does not fit the memory budget, idle models are unloaded least recently used first;
models serving requests are never unloaded under them.

Deleting a model goes through ``remove_model`` on every surface: the model leaves the pool at
once (``ps`` no longer lists it, no new request reaches it), requests in flight on it finish
(its blob stays readable through the memory map even once unlinked), and the last one to end
unloads it. A model removed from the registry by another process (the CLI) is noticed by the
reaper and leaves the pool the same way.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncGenerator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from appliance.audit import Context
from appliance.engine.batcher import Batcher, Event, Finished, GenerationRequest
from appliance.engine.chat import ChatTemplate
from appliance.engine.llama import LlamaContext, LlamaModel, SamplingParams, gpu_offload_supported
from appliance.errors import (
    ApplianceError,
    DiskFull,
    EngineFailure,
    InsufficientMemory,
    ModelNotFound,
    ModelNotLoadable,
    PromptTooLong,
)
from appliance.models.service import ModelService
from appliance.names import ModelName
from appliance.settings import EngineSettings
from appliance.store.base import Model
from appliance.store.cache import BlobCache

__all__ = ["EnginePool", "LoadedModel", "Route", "estimate_memory"]

ENGINE_NAME = "local:llama.cpp"
_COMPUTE_OVERHEAD = 64 * 1024 * 1024


@dataclass(frozen=True)
class Route:
    """Which engine serves a request and why (REQ-MODELS-0118)."""

    engine: str
    node: str
    reason: str


@dataclass
class LoadedModel:
    name: ModelName
    digest: str
    size_bytes: int
    memory_bytes: int
    seq_ctx: int
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
    embed_lock: threading.Lock = field(default_factory=threading.Lock)
    embedder: LlamaContext | None = None

    def tokenize(self, text: str) -> list[int]:
        add_bos = not text.startswith(self.template.bos_token) if self.template.bos_token else True
        return self.model.tokenize(text, add_special=add_bos)

    def close(self) -> None:
        self.context.close()
        if self.embedder is not None:
            self.embedder.close()
        self.model.close()


def estimate_memory(capabilities: dict[str, Any], *, weights: int, n_ctx: int) -> int:
    """Weights (mapped whole) + an f16 KV cache for ``n_ctx`` tokens + compute buffers."""
    layers = int(capabilities.get("block_count", 0))
    embedding = int(capabilities.get("embedding_length", 0))
    heads = int(capabilities.get("head_count", 1)) or 1
    kv_heads = int(capabilities.get("head_count_kv", heads)) or heads
    kv_cache = 2 * layers * n_ctx * (embedding // heads) * kv_heads * 2
    return weights + kv_cache + _COMPUTE_OVERHEAD


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class EnginePool:
    def __init__(self, settings: EngineSettings, models: ModelService, cache: BlobCache) -> None:
        self.settings = settings
        self.models = models
        self.cache = cache
        self.budget = settings.memory_budget or int(_physical_memory() * 0.75)
        self._loaded: dict[ModelName, LoadedModel] = {}
        self._retired: list[LoadedModel] = []  # deleted, still serving: their memory is still held
        self._lock = threading.RLock()  # guards _loaded, _retired and in_use counts
        self._load_locks: dict[ModelName, threading.Lock] = {}
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="model-reaper", daemon=True)
        self._reaper.start()

    @property
    def gpu_offload(self) -> bool:
        return gpu_offload_supported()

    # -- loading -------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._loaded.values(), key=lambda loaded: str(loaded.name))

    def acquire(self, name: str, *, context_length: int | None = None) -> tuple[LoadedModel, Route]:
        """The loaded model for ``name`` (loading it if needed), held until ``release``.

        ``context_length`` asks for that context per request (capped at the model's own). An idle
        model loaded with another context is reloaded, as Ollama does for ``num_ctx``; one that is
        serving requests keeps its context, since reloading would cut those requests off.
        """
        model = self.models.get(name)
        wanted = self._context_length(model, context_length)
        gguf = next((a.digest for a in model.artifacts if a.format == "gguf"), None)

        def reload_needed(loaded: LoadedModel) -> bool:
            idle = loaded.in_use == 0 and loaded.batcher.idle
            replaced = loaded.digest != gguf  # another GGUF was imported under this name
            return idle and (replaced or (context_length is not None and loaded.seq_ctx != wanted))

        with self._lock:
            loaded = self._loaded.get(model.name)
            if loaded is not None and not reload_needed(loaded):
                loaded.in_use += 1
                loaded.expires_at = None
                return loaded, Route(ENGINE_NAME, "local", "the model was already loaded")
            load_lock = self._load_locks.setdefault(model.name, threading.Lock())
        with load_lock:  # one load per model, however many requests arrive at once
            with self._lock:
                loaded = self._loaded.get(model.name)
                reload = loaded is not None and reload_needed(loaded)
                file_replaced = reload and loaded is not None and loaded.digest != gguf
                fresh = loaded is None
                if reload:
                    del self._loaded[model.name]
            if loaded is None or reload:
                if loaded is not None:
                    self._close(loaded)
                loaded = self._load(model, wanted)
            with self._lock:
                self._loaded[model.name] = loaded
                loaded.in_use += 1
                loaded.expires_at = None
        if file_replaced:
            reason = "reloaded: the model's file was replaced"
        elif reload:
            reason = f"reloaded with the requested context of {wanted} tokens"
        elif fresh:
            reason = "loaded from the local cache on demand"
        else:
            reason = "the model was already loaded"
        return loaded, Route(ENGINE_NAME, "local", reason)

    def _context_length(self, model: Model, requested: int | None) -> int:
        """Tokens per sequence: the request's, else the stored preference (set from the UI), else
        the setting; never more than the model was trained for."""
        configured = requested or int(
            self.models.store.get_preference("engine.context_length") or self.settings.context_length
        )
        trained = int(model.capabilities.get("context_length") or configured)
        return min(configured, trained)

    def release(self, loaded: LoadedModel, *, keep_alive: float | None = None) -> None:
        keep = self.settings.keep_alive if keep_alive is None else keep_alive
        with self._lock:
            loaded.in_use -= 1
            loaded.last_used = time.monotonic()
            if loaded.in_use == 0:
                loaded.expires_at = None if keep < 0 else loaded.last_used + keep
            finished_retired = loaded.retired and loaded.in_use == 0
            if finished_retired:
                self._retired.remove(loaded)
        if finished_retired:
            self._close(loaded)
        elif keep == 0:
            self._reap()

    def load(
        self, name: str, *, keep_alive: float | None = None, context_length: int | None = None
    ) -> LoadedModel:
        loaded, _ = self.acquire(name, context_length=context_length)
        self.release(loaded, keep_alive=keep_alive)
        return loaded

    def unload(self, name: str) -> bool:
        model_name = self.models.get(name).name
        with self._lock:
            loaded = self._loaded.pop(model_name, None)
        if loaded is None:
            return False
        self._close(loaded)
        return True

    def remove_model(self, name: str, context: Context) -> int:
        """Delete a model from the registry and the pool (see the module docstring); the bytes freed."""
        model_name = self.models.get(name).name  # an unknown name is a 404, as on every other route
        freed = self.models.remove(str(model_name), context)
        with self._lock:
            loaded = self._loaded.get(model_name)
        if loaded is not None:
            self._retire(loaded)
        return freed

    def _retire(self, loaded: LoadedModel) -> None:
        """Take a model out of the pool; it unloads now if idle, else when its last request ends."""
        with self._lock:
            if self._loaded.get(loaded.name) is not loaded:
                return  # already gone, or reloaded meanwhile
            del self._loaded[loaded.name]
            idle = loaded.in_use == 0
            if not idle:
                loaded.retired = True
                self._retired.append(loaded)
        if idle:
            self._close(loaded)

    def _retire_removed(self) -> None:
        """A model removed behind the pool's back (``appliance models rm`` works on the registry
        directly), or replaced by another file under its name, leaves the pool like any removal."""
        for loaded in self.loaded():
            try:
                current = self.models.get(str(loaded.name))
            except ModelNotFound:
                self._retire(loaded)
                continue
            except ApplianceError:
                return  # the registry cannot answer now: try again at the next round
            if loaded.digest not in {artifact.digest for artifact in current.artifacts}:
                self._retire(loaded)

    def _load(self, model: Model, seq_ctx: int) -> LoadedModel:
        artifact = next((a for a in model.artifacts if a.format == "gguf"), None)
        if artifact is None:
            raise ModelNotLoadable(f"model {model.name} has no GGUF file ({', '.join(model.formats)})")
        if artifact.state != "ok" or not self.cache.has(artifact.digest):
            raise ModelNotLoadable(
                f"model {model.name}'s file failed verification and is quarantined",
                hint="remove the model and import it again",
            )
        self.models.ensure_intact(artifact.digest)
        capabilities = model.capabilities
        n_seq = self.settings.parallel
        memory = estimate_memory(capabilities, weights=artifact.size_bytes, n_ctx=seq_ctx * n_seq)
        self._make_room(memory, model.name)
        gpu_layers = self.settings.n_gpu_layers
        if gpu_layers is None:
            gpu_layers = -1 if gpu_offload_supported() else 0
        threads = self.settings.threads or os.cpu_count() or 1
        llama_model = LlamaModel(self.cache.path(artifact.digest), n_gpu_layers=gpu_layers)
        try:
            context = LlamaContext(
                llama_model, n_ctx=seq_ctx * n_seq, n_seq=n_seq, n_batch=max(512, seq_ctx), threads=threads
            )
        except BaseException:
            llama_model.close()
            raise
        batcher = Batcher(
            llama_model, context, n_seq=n_seq, seq_ctx=seq_ctx, queue_size=self.settings.queue_size
        )
        template = ChatTemplate(
            llama_model.chat_template(),
            bos_token=llama_model.token_text(llama_model.bos) if llama_model.bos >= 0 else "",
            eos_token=llama_model.token_text(llama_model.eos) if llama_model.eos >= 0 else "",
        )
        with suppress(DiskFull):  # last use only orders evictions: a full disk must not stop serving
            self.models.store.touch_model(model.name)
        return LoadedModel(
            name=model.name,
            digest=artifact.digest,
            size_bytes=artifact.size_bytes,
            memory_bytes=memory,
            seq_ctx=seq_ctx,
            gpu_layers=gpu_layers,
            model=llama_model,
            context=context,
            batcher=batcher,
            template=template,
            capabilities=capabilities,
        )

    def _make_room(self, needed: int, incoming: ModelName) -> None:
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
                del self._loaded[victim.name]
            self._close(victim)

    def _close(self, loaded: LoadedModel) -> None:
        loaded.batcher.stop(EngineFailure(f"model {loaded.name} was unloaded"))
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
                del self._loaded[loaded.name]
        for loaded in expired:
            self._close(loaded)

    def _reap_forever(self) -> None:
        while not self._closing.wait(timeout=0.5):
            self._reap()
            self._retire_removed()

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

    async def generate(
        self,
        loaded: LoadedModel,
        prompt: list[int],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
    ) -> AsyncGenerator[Event]:
        """Stream events for one request; closing the iterator early frees its sequence."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
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

    def embed(self, loaded: LoadedModel, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings, one input at a time on a context of their own (blocking)."""
        vectors: list[list[float]] = []
        tokens_used = 0
        with loaded.embed_lock:
            if loaded.embedder is None:
                loaded.embedder = LlamaContext(
                    loaded.model,
                    n_ctx=loaded.seq_ctx,
                    n_seq=1,
                    n_batch=loaded.seq_ctx,
                    threads=self.settings.threads or os.cpu_count() or 1,
                    embeddings=True,
                )
            for text in texts:
                tokens = loaded.tokenize(text)
                if len(tokens) > loaded.seq_ctx:
                    raise PromptTooLong(
                        f"an input has {len(tokens)} tokens; this model's context holds {loaded.seq_ctx}"
                    )
                loaded.embedder.forget(0)
                loaded.embedder.decode([(token, index, 0, True) for index, token in enumerate(tokens)])
                vectors.append(loaded.embedder.sequence_embedding(0, loaded.model.n_embd))
                tokens_used += len(tokens)
        return vectors, tokens_used
