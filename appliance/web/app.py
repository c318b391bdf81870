"""Assembles the Litestar app: controllers, lifespan, dependencies, error map. No logic here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import swagger_ui_bundle
from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router

from appliance import __version__
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.web.anthropic import anthropic_router
from appliance.web.audit import AuditController
from appliance.web.auth import (
    OPENAPI_COMPONENTS,
    OPENAPI_SECURITY,
    KeysController,
    UsersController,
    auth_guard,
    me,
)
from appliance.web.bundles import bundle_router
from appliance.web.cluster import CLUSTER_DEPENDENCIES, CLUSTER_ROUTES, NodesController, cluster_lifespan
from appliance.web.cluster_tasks import ClusterTasksController, cluster_tasks_lifespan
from appliance.web.completions import completions_router
from appliance.web.db import db_status
from appliance.web.dependencies import (
    provide_audit,
    provide_context,
    provide_creator,
    provide_inference,
    provide_models,
    provide_preferences,
    provide_provisioner,
    provide_router,
    provide_settings,
)
from appliance.web.docs import DOCS_ASSETS, DocsPage
from appliance.web.downloads import DownloadsController, pull_model
from appliance.web.engine import EngineController, metrics
from appliance.web.errors import PROBLEM_HANDLERS
from appliance.web.guards import SecurityHeaders
from appliance.web.health import HealthController
from appliance.web.importdir import import_dir
from appliance.web.login import LOGIN_ROUTES
from appliance.web.mcp import mcp_endpoint, mcp_lifespan, mcp_tools
from appliance.web.models import ModelsController
from appliance.web.ollama import ollama_router
from appliance.web.ollama_models import ollama_models_router
from appliance.web.openai import openai_router
from appliance.web.openapi import complete_openapi
from appliance.web.providers import ProvidersController
from appliance.web.responses import responses_router
from appliance.web.system import SystemController
from appliance.web.tasks import TasksController
from appliance.web.ui import UI_DIR, ui_assets, ui_page

__all__ = ["create_app"]


def create_app(settings: Settings, *, setup_token: str | None = None) -> Litestar:
    """The app; ``setup_token`` (printed by ``serve``) lets the first admin be made in the browser."""

    @asynccontextmanager
    async def runtime_lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.runtime = Runtime.open(settings, with_engine=True)
        if setup_token is not None:
            app.state.runtime.login.offer_setup(setup_token)
        try:
            yield
        finally:
            app.state.runtime.close()

    app = Litestar(
        route_handlers=[
            ui_page,
            ui_assets,
            HealthController,
            pull_model,
            ModelsController,
            bundle_router,
            import_dir,
            DownloadsController,
            TasksController,
            NodesController,
            ProvidersController,
            *CLUSTER_ROUTES,
            ClusterTasksController,
            SystemController,
            db_status,
            AuditController,
            UsersController,
            KeysController,
            me,
            *LOGIN_ROUTES,
            EngineController,
            metrics,
            mcp_endpoint,
            mcp_tools,
            openai_router,
            completions_router,
            responses_router,
            anthropic_router,
            ollama_router,
            ollama_models_router,
            create_static_files_router(
                path=DOCS_ASSETS,
                directories=[swagger_ui_bundle.swagger_ui_path, UI_DIR],  # UI_DIR: docs.js
                include_in_schema=False,
            ),
        ],
        lifespan=[runtime_lifespan, cluster_lifespan, cluster_tasks_lifespan, mcp_lifespan],
        on_startup=[complete_openapi],
        dependencies={
            "audit": Provide(provide_audit, sync_to_thread=False),
            "models": Provide(provide_models, sync_to_thread=False),
            "provisioner": Provide(provide_provisioner, sync_to_thread=False),
            "preferences": Provide(provide_preferences, sync_to_thread=False),
            "context": Provide(provide_context, sync_to_thread=False),
            "inference": Provide(provide_inference, sync_to_thread=False),
            "router": Provide(provide_router, sync_to_thread=False),
            "creator": Provide(provide_creator, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            **CLUSTER_DEPENDENCIES,
        },
        exception_handlers=PROBLEM_HANDLERS,
        before_request=auth_guard(settings),
        request_max_body_size=settings.server.max_body_bytes,  # the streaming uploads opt out
        openapi_config=OpenAPIConfig(
            title="Appliance",
            version=__version__,
            path="/schema",
            render_plugins=[DocsPage()],
            components=OPENAPI_COMPONENTS,
            security=OPENAPI_SECURITY if settings.auth_enabled else None,  # as served
        ),
    )
    # Wrapping the whole handler, not as route middleware, so unrouted 404s get the headers too.
    app.asgi_handler = SecurityHeaders(app.asgi_handler)
    return app
