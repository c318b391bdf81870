"""The long-lived parts (store, cache, services), opened once per process and closed on exit.

The server opens it (in its app's lifespan, on its event loop) with its engine: the in-process
pool and the workers' directory behind the router, and the inference service over both. May
import every service, the store and the cache; nothing imports it but the entry points (CLI,
web app).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.auth.login import LoginService
from appliance.auth.service import AuthService
from appliance.cluster.peers import Peers
from appliance.cluster.service import ClusterService
from appliance.egress.client import Egress
from appliance.egress.providers import ProviderService
from appliance.metrics import Metrics
from appliance.models.service import ModelService
from appliance.preferences import PreferenceService
from appliance.provision.service import Provisioner
from appliance.settings import Settings
from appliance.store.base import Store
from appliance.store.cache import BlobCache
from appliance.store.factory import open_data_dir
from appliance.tasks.service import TaskService

if TYPE_CHECKING:
    from appliance.cluster.channel import WorkChannel
    from appliance.cluster.directory import ClusterDirectory
    from appliance.engine.router import Router
    from appliance.engine.service import InferenceService
    from appliance.store.admin import DbStatus

__all__ = ["Runtime"]


@dataclass
class Runtime:
    settings: Settings
    store: Store
    cache: BlobCache
    models: ModelService
    provisioner: Provisioner
    preferences: PreferenceService
    metrics: Metrics
    auth: AuthService
    login: LoginService
    tasks: TaskService
    cluster: ClusterService
    peers: Peers  # the other servers sharing the store; only a serving one registers and fetches
    providers: ProviderService  # external providers and their sealed keys (the CLI's too)
    egress: Egress  # the one component that calls them (`providers test` from the CLI too)
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
        peers = Peers(settings, store, cache, models, provisioner)
        providers = ProviderService(settings, store)
        metrics = Metrics()
        runtime = cls(
            settings=settings,
            store=store,
            cache=cache,
            models=models,
            provisioner=provisioner,
            preferences=preferences,
            metrics=metrics,
            auth=(auth := AuthService(settings, store, preferences)),
            login=LoginService(settings, store, auth),
            tasks=TaskService(settings, store, models, server=peers.id),
            cluster=ClusterService(settings, store, models),
            peers=peers,
            providers=providers,
            egress=Egress(
                settings,
                providers,
                store=store,
                metrics=metrics,
                preferences=preferences,
                directory=providers,  # every provider's key is scrubbed from what comes back
            ),
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
        return runtime

    def database_status(self) -> DbStatus:
        """Where this process's store stands: backend, location, migrations, rows per table."""
        # Imported here: the PostgreSQL driver and sqlite_utils cost every command's start ~0.2 s.
        from appliance.store import admin

        return admin.status(self.settings)

    def close(self) -> None:
        self.tasks.close()  # first: a prompt task running now still needs the router
        self.peers.close()  # before the provisioner: a fetch may be pulling again through it
        self.provisioner.close()
        if self.router is not None:
            self.router.close()
        self.egress.close()
        self.store.close()
