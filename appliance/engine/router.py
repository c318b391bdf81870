"""From a model name to an engine: resolve it through the registry into a ``LoadSpec``, pick the
engine that serves it, and record why (REQ-MODELS-0118).

This is the service layer above the engines: what a name means (load, unload, remove) lives here,
so the engines deal in digests and paths only. With workers, a ``NodeDirectory`` lists them as
placement candidates beside the in-process engine (node ``local``, unless ``local`` is false: a
server that only coordinates), ``place`` picks one, and its reason goes into the route
(REQ-MODELS-0105, 0118); with none, the in-process engine serves as it always has. Loading,
unloading and ``ps`` are the in-process engine's: a worker loads what its configuration lists.

With external providers (a ``ProviderDirectory``), ``route`` may answer ``ExternalRouted`` instead:
the pure policy in ``engine/routing.py`` decides from the name, whether a local path fits, the
providers and the ``model_routing`` preferences (REQ-MODELS-0112..0118).
May import the engine's base, the registry (``appliance.models``), the
store's types, the cache, the pure placement (``appliance.cluster.placement``) and the egress types;
never the web layer, the egress component, nor the cluster's implementations (the directories are
protocols).
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

from appliance.audit import Context
from appliance.cluster.placement import LOCAL, Candidate, place
from appliance.egress.types import Operation, Provider, ProviderDirectory
from appliance.engine.base import Engine, LoadedInfo, LoadSpec, Route
from appliance.engine.routing import Policy, decide
from appliance.errors import (
    ApplianceError,
    BlobFetching,
    Conflict,
    DiskFull,
    InvalidModelName,
    ModelNotFound,
    ModelNotLoadable,
    NotReady,
)
from appliance.models.layers import ModelLayers
from appliance.models.service import ModelService
from appliance.names import ModelName
from appliance.preferences import CONTEXT_LENGTH, PreferenceService
from appliance.settings import EngineSettings
from appliance.store.base import Model, Store
from appliance.store.cache import BlobCache

__all__ = ["ExternalRouted", "Loaded", "NodeDirectory", "Routed", "Router", "resolve_spec"]

REGISTRY_CHECK_SECONDS = 0.5
# Why a local path may not fit, so that an allowed provider may serve the name instead. A blob on
# its way (BlobFetching) is not among them: the local path fits in a moment.
_NOT_LOCAL = (ModelNotFound, InvalidModelName, ModelNotLoadable, NotReady)
# A model's last use orders evictions, to the second at best: writing it on every request would
# make each one a database write (and, on a shared PostgreSQL, a row every server contends for).
TOUCH_EVERY = 1.0


@dataclass(frozen=True)
class Loaded:
    """A loaded model as the APIs list it: by its registry name."""

    name: ModelName
    info: LoadedInfo


def resolve_spec(
    models: ModelService, name: str, *, context_length: int | None = None, n_gpu_layers: int | None = None
) -> tuple[ModelName, LoadSpec]:
    """The model's GGUF as a load spec (blocking: it may re-hash a hard-linked blob): what the
    local engine loads, and what a worker is told to (its own path for the digest replaces ours)."""
    model = models.get(name)
    artifact = next((a for a in model.artifacts if a.format == "gguf"), None)
    if artifact is None:
        raise ModelNotLoadable(f"model {model.name} has no GGUF file ({', '.join(model.formats)})")
    if artifact.state != "ok":
        raise ModelNotLoadable(
            f"model {model.name}'s file failed verification and is quarantined",
            hint="remove the model and import it again",
        )
    models.bring_blobs(model)  # registered by a server sharing the store, and not in this cache yet
    models.ensure_intact(artifact.digest)
    spec = LoadSpec(
        key=str(model.name),
        digest=artifact.digest,
        path=models.blob_path(artifact.digest),
        size_bytes=artifact.size_bytes,
        context_length=_context_length(models.preferences, model, context_length),
        context_requested=context_length is not None,
        n_gpu_layers=n_gpu_layers,
        capabilities=model.capabilities,
        chat_template=models.layers(model).template,
    )
    return model.name, spec


def _context_length(preferences: PreferenceService, model: Model, requested: int | None) -> int:
    """Tokens per sequence: the request's, else the stored preference (set from the UI), else
    the setting; never more than the model was trained for."""
    configured = requested or preferences.effective(CONTEXT_LENGTH)
    trained = int(model.capabilities.get("context_length") or configured)
    return min(configured, trained)


class NodeDirectory(Protocol):
    """The worker nodes routing may pick (the cluster implements it; cheap: called per request)."""

    def candidates(self, digest: str) -> list[Candidate]:
        """Every worker node, as a placement candidate for the model whose blob is ``digest``."""
        ...

    def engine(self, candidate: Candidate) -> Engine:
        """The engine that reaches a worker ``candidates`` listed."""
        ...


@dataclass(frozen=True)
class Routed:
    """Where a request goes: the engine, what it loads, the model's name, and why that node (None
    when the in-process engine is the only one)."""

    engine: Engine
    spec: LoadSpec
    name: ModelName
    placement: str | None = None

    layers: ModelLayers = field(
        default_factory=ModelLayers
    )  # what a model made by /api/create adds to each request

    def route(self, reason: str) -> Route:
        """The route as recorded, once the engine says how it came to have the model (``reason``)."""
        why = reason if self.placement is None else f"{self.placement}; {reason}"
        return Route(self.engine.name, self.engine.node, why)


@dataclass(frozen=True)
class ExternalRouted:
    """A request an external provider serves, through the egress component: the provider, its own
    name of the model, and why routing sent it there."""

    provider: Provider
    model: str
    reason: str

    def route(self) -> Route:
        """As the inference log and the X-Appliance-Engine headers show it."""
        return Route(f"external:{self.provider.kind}", self.provider.name, self.reason)


class Router:
    def __init__(
        self,
        settings: EngineSettings,
        models: ModelService,
        *,
        store: Store,
        cache: BlobCache,
        preferences: PreferenceService,
        engine: Engine,
        nodes: NodeDirectory | None = None,
        local: bool = True,
        providers: ProviderDirectory | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.cache = cache
        self.preferences = preferences
        self.engine = engine
        self.nodes = nodes
        self.local = local  # cluster.local_inference: the in-process engine is a candidate
        self.providers = providers  # the external providers; None: this process routes locally only
        self._touched: dict[ModelName, float] = {}  # name -> when its last use was written (monotonic)
        self._touched_lock = threading.Lock()
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch_registry, name="registry-watch", daemon=True)
        self._watcher.start()

    # -- resolving -----------------------------------------------------------------------------

    def resolve(self, name: str, *, context_length: int | None = None) -> tuple[ModelName, LoadSpec]:
        """The model's GGUF as a load spec (blocking: it may re-hash a hard-linked blob)."""
        return resolve_spec(
            self.models, name, context_length=context_length, n_gpu_layers=self.settings.n_gpu_layers
        )

    def layers(self, name: str) -> ModelLayers:
        """What a model made by ``/api/create`` adds to each request: system, messages, options."""
        return self.models.layers(self.models.get(name))

    def route(
        self,
        name: str,
        *,
        context_length: int | None = None,
        provider: str | None = None,
        operation: Operation = "chat",
        busy: NotReady | None = None,
    ) -> Routed | ExternalRouted:
        """Where a request for ``name`` goes (blocking): a local engine or worker, or an external
        provider when policy allows (``engine/routing.py``). ``provider`` is the X-Appliance-Provider
        header; ``busy`` the local engine's refusal of this request (its queue is full), which sends
        it elsewhere when policy allows and is raised again when not. Refusals say why."""
        providers = self.providers.list() if self.providers is not None else []
        policy = (
            Policy.read(self.preferences) if providers else Policy()
        )  # no provider: no preference to read

        def external(local: ApplianceError | None) -> ExternalRouted | None:
            decision = decide(
                name, operation=operation, providers=providers, policy=policy, local=local, named=provider
            )
            if decision.provider is None:
                return None
            return ExternalRouted(decision.provider, decision.model, decision.reason)

        if busy is not None:
            routed = external(busy)
            assert routed is not None  # a local path that is busy never fits
            return routed
        if provider is not None or not policy.prefer_local:
            # named, or a provider goes first: the local path is not even looked at when it wins
            first = external(None)
            if first is not None:
                return first
        try:
            local = self._route_local(name, context_length)
        except _NOT_LOCAL as exc:
            if isinstance(exc, BlobFetching):
                raise
            routed = external(exc)
            assert routed is not None
            return routed
        return local

    def external_models(self) -> list[tuple[str, Provider]]:
        """The models allowed providers list, as ``provider/model`` with their provider: what
        ``/v1/models`` shows beside the local ones (none offline; a provider that serves any name
        lists nothing)."""
        providers = self.providers.list() if self.providers is not None else []
        if not providers:
            return []
        policy = Policy.read(self.preferences)
        if policy.offline:
            return []
        return [
            (f"{provider.name}/{model}", provider)
            for provider in providers
            if policy.allows(provider)
            for model in provider.models
        ]

    def _route_local(self, name: str, context_length: int | None) -> Routed:
        """The local engine or the worker that serves ``name`` and what it loads; records the use
        (LRU eviction order). A created model's ``num_ctx`` applies when the request sets none."""
        layers = self.layers(name)
        if context_length is None:
            num_ctx = layers.parameters.get("num_ctx")
            context_length = num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else None
        model_name, spec = self.resolve(name, context_length=context_length)
        self.touch(model_name)
        nodes = self.nodes
        workers = nodes.candidates(spec.digest) if nodes is not None else []
        if not self.local and (nodes is None or not workers):
            raise NotReady(
                f"no worker can serve {model_name}: this server only coordinates"
                " (cluster.local_inference is false) and no worker is joined and reachable",
                hint="join a worker (appliance worker join), or set cluster.local_inference to true",
            )
        if nodes is None or not workers:
            return Routed(self.engine, spec, model_name, layers=layers)
        local = [self._local_candidate(spec.digest)] if self.local else []
        placement = place(spec.digest, spec.size_bytes, [*local, *workers])
        chosen = placement.candidate
        engine = self.engine if chosen.local else nodes.engine(chosen)
        return Routed(engine, spec, model_name, placement.reason, layers=layers)

    def _local_candidate(self, digest: str) -> Candidate:
        """The in-process engine as a node: the server's cache holds every registered model."""
        loaded = self.engine.loaded()
        budget = self.engine.memory_budget
        return Candidate(
            id=LOCAL,
            name=LOCAL,
            local=True,
            loaded=frozenset(info.digest for info in loaded),
            cached=frozenset({digest}),  # resolve() found the blob in the server's cache
            memory_budget=budget,
            memory_free=max(0, budget - sum(info.memory_bytes for info in loaded)),
            load=sum(info.active_requests + info.queued_requests for info in loaded),
        )

    def touch(self, name: ModelName) -> None:
        """Record the model's use: at most once every TOUCH_EVERY seconds per model."""
        now = time.monotonic()
        with self._touched_lock:
            last = self._touched.get(name)
            if last is not None and now - last < TOUCH_EVERY:
                return
            self._touched[name] = now
        with suppress(DiskFull):  # last use only orders evictions: a full disk must not stop serving
            self.store.touch_model(name)

    # -- what a name means -------------------------------------------------------------------------

    def loaded(self) -> list[Loaded]:
        return [Loaded(ModelName.parse(info.key), info) for info in self.engine.loaded()]

    def load(
        self, name: str, *, keep_alive: float | None = None, context_length: int | None = None
    ) -> tuple[Loaded, Route]:
        """Load now (blocking), rather than on the first request, into the in-process engine."""
        if not self.local:
            # A coordinator holds no model: its own engine is no routing candidate, so a model
            # loaded there would only take memory. An unknown name stays a 404, as elsewhere.
            model_name = self.models.get(name).name
            raise Conflict(
                f"cannot load {model_name} here: this server only coordinates"
                " (cluster.local_inference is false) and holds no model",
                hint=f"load it onto a node with `appliance nodes load NODE {model_name}`",
            )
        model_name, spec = self.resolve(name, context_length=context_length)
        self.touch(model_name)
        info, reason = self.engine.load(spec, keep_alive=keep_alive)
        return Loaded(model_name, info), Routed(self.engine, spec, model_name).route(reason)

    def unload(self, name: str) -> bool:
        """Unload now; requests in flight on it end with an error. False when it was not loaded."""
        return self.engine.unload(str(self.models.get(name).name))

    def unload_when_idle(self, name: str) -> None:
        """Ollama's keep_alive 0 without a prompt: unload once no request runs on it. An unknown
        name is a 404 whether loaded or not; a model that is not loaded stays so."""
        self.engine.unload_when_idle(str(self.models.get(name).name))

    def remove_model(self, name: str, context: Context) -> int:
        """Delete a model from the registry and retire it from the engine; the bytes freed.

        The model leaves ``loaded`` at once (no new request reaches it), requests in flight on it
        finish, and the last one to end unloads it.
        """
        model_name = self.models.get(name).name  # an unknown name is a 404, as on every other route
        freed = self.models.remove(str(model_name), context)
        self.engine.retire(str(model_name))
        return freed

    def retire_removed(self) -> None:
        """A model removed behind the server's back (``appliance models rm`` works on the registry
        directly), or whose file was replaced under its name, leaves the engine like any removal."""
        for loaded in self.loaded():
            try:
                current = self.models.get(loaded.name)
            except ModelNotFound:
                self.engine.retire(loaded.info.key)
                continue
            except ApplianceError:
                return  # the registry cannot answer now: try again at the next round
            if loaded.info.digest not in {artifact.digest for artifact in current.artifacts}:
                self.engine.retire(loaded.info.key)

    def _watch_registry(self) -> None:
        while not self._closing.wait(timeout=REGISTRY_CHECK_SECONDS):
            self.retire_removed()

    @property
    def memory_budget(self) -> int:
        return self.engine.memory_budget

    @property
    def gpu_offload(self) -> bool:
        return self.engine.gpu_offload

    def close(self) -> None:
        self._closing.set()
        self._watcher.join()
        self.engine.close()
