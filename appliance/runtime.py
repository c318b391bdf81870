"""The long-lived parts (store, cache, services), opened once per process and closed on exit.

The server opens it (in its app's lifespan, on its event loop) with its engine: the in-process
pool and the workers' directory behind the router, and the inference service over both. May
import every service, the store and the cache; nothing imports it but the entry points (CLI,
web app).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from appliance.cluster.peers import Peers
from appliance.models.service import ModelService
from appliance.preferences import PreferenceService
from appliance.provision.service import Provisioner
from appliance.settings import Settings
from appliance.store.base import Store
from appliance.store.cache import BlobCache
from appliance.store.factory import open_data_dir

if TYPE_CHECKING:
    from appliance.auth.login import LoginService
    from appliance.auth.service import AuthService
    from appliance.cluster.channel import WorkChannel
    from appliance.cluster.directory import ClusterDirectory
    from appliance.cluster.service import ClusterService
    from appliance.egress.client import Egress
    from appliance.egress.providers import ProviderService
    from appliance.engine.router import Router
    from appliance.engine.service import InferenceService
    from appliance.metrics import Metrics
    from appliance.store.admin import DbStatus
    from appliance.tasks.service import TaskService

__all__ = ["Runtime"]


@dataclass(eq=False)
class Runtime:
    """The store, the cache, the models, the preferences, the provisioner and the peers are opened at
    once; every other service (and its imports) when first used, so a command pays only for what it
    touches."""

    settings: Settings
    store: Store
    cache: BlobCache
    models: ModelService
    preferences: PreferenceService
    provisioner: Provisioner
    peers: Peers  # the other servers sharing the store; only a serving one registers and fetches
    router: Router | None = None  # only the server loads models; CLI commands never do
    inference: InferenceService | None = None
    channel: WorkChannel | None = None  # the server's work channel to its workers (on its event loop)
    nodes: ClusterDirectory | None = None  # the workers as routing and readiness see them

    @classmethod
    def open(cls, settings: Settings, *, with_engine: bool = False) -> Runtime:
        cache, store = open_data_dir(settings)
        preferences = PreferenceService(settings, store)
        models = ModelService(settings, store, cache, preferences=preferences)
        provisioner = Provisioner(settings, store, cache, models, preferences=preferences)
        runtime = cls(
            settings=settings,
            store=store,
            cache=cache,
            models=models,
            provisioner=provisioner,
            preferences=preferences,
            # every command's: its server id, and whether the registry is shared (gc keeps others' rows)
            peers=Peers(settings, store, cache, models, provisioner),
        )
        if with_engine:
            # Imported here: loading llama.cpp's library is only worth it in the process that serves.
            from appliance.cluster.channel import WorkChannel
            from appliance.cluster.directory import ClusterDirectory
            from appliance.engine.pool import EnginePool
            from appliance.engine.router import Router
            from appliance.engine.service import InferenceService

            runtime.channel = WorkChannel(lease=settings.cluster.lease)
            # Opened in the app's lifespan: this loop is the server's, where the channel lives.
            loop = asyncio.get_running_loop()
            runtime.nodes = ClusterDirectory(runtime.cluster, runtime.channel, loop=loop)
            engine = EnginePool(settings.engine)
            runtime.router = Router(
                settings.engine,
                models,
                store=store,
                cache=cache,
                preferences=preferences,
                engine=engine,
                nodes=runtime.nodes,
                local=settings.cluster.local_inference,
                providers=runtime.providers,
            )
            runtime.inference = InferenceService(
                runtime.router, store, runtime.metrics, egress=runtime.egress
            )
            # The process that serves runs the task queue: prompts go through its inference service.
            runtime.tasks.inference = runtime.inference
            runtime.tasks.start()
            runtime.peers.start()
            # The rest too, before any request: request threads would otherwise race to build one
            # (the login throttle's counts must live in a single LoginService).
            runtime.login  # noqa: B018 (building it is the point)
        return runtime

    @cached_property
    def metrics(self) -> Metrics:
        from appliance.metrics import Metrics

        return Metrics()

    @cached_property
    def auth(self) -> AuthService:
        from appliance.auth.service import AuthService

        return AuthService(self.settings, self.store, self.preferences)

    @cached_property
    def login(self) -> LoginService:
        from appliance.auth.login import LoginService

        return LoginService(self.settings, self.store, self.auth)

    @cached_property
    def tasks(self) -> TaskService:
        from appliance.tasks.service import TaskService

        return TaskService(self.settings, self.store, self.models, server=self.peers.id)

    @cached_property
    def cluster(self) -> ClusterService:
        from appliance.cluster.service import ClusterService

        return ClusterService(self.settings, self.store, self.models)

    @cached_property
    def providers(self) -> ProviderService:
        """External providers and their sealed keys (the CLI's too)."""
        from appliance.egress.providers import ProviderService

        return ProviderService(self.settings, self.store)

    @cached_property
    def egress(self) -> Egress:
        """The one component that calls the providers (`providers test` from the CLI too)."""
        from appliance.egress.client import Egress

        return Egress(
            self.settings,
            self.providers,
            store=self.store,
            metrics=self.metrics,
            preferences=self.preferences,
            directory=self.providers,  # every provider's key is scrubbed from what comes back
        )

    def _built(self, service: str) -> bool:
        return service in self.__dict__  # where a cached_property keeps what it built

    def database_status(self) -> DbStatus:
        """Where this process's store stands: backend, location, migrations, rows per table."""
        # Imported here: the PostgreSQL driver and sqlite_utils cost every command's start ~0.2 s.
        from appliance.store import admin

        return admin.status(self.settings)

    def close(self) -> None:
        if self._built("tasks"):
            self.tasks.close()  # first: a prompt task running now still needs the router
        self.peers.close()  # before the provisioner: a fetch may be pulling again through it
        self.provisioner.close()
        if self.router is not None:
            self.router.close()
        if self._built("egress"):
            self.egress.close()
        self.store.close()
