"""Assembles the Litestar app: controllers, lifespan, dependencies, error map. No logic here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import swagger_ui_bundle
from litestar import Litestar, Request
from litestar.config.allowed_hosts import AllowedHostsConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

from appliance import __version__
from appliance.errors import Forbidden
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.web.audit import AuditController
from appliance.web.dependencies import (
    provide_context,
    provide_inference,
    provide_models,
    provide_pool,
    provide_preferences,
    provide_provisioner,
    provide_store,
)
from appliance.web.downloads import DownloadsController, pull_model
from appliance.web.engine import EngineController, metrics
from appliance.web.errors import EXCEPTION_HANDLERS
from appliance.web.health import HealthController
from appliance.web.models import ModelsController
from appliance.web.ollama import ollama_router
from appliance.web.openai import openai_router
from appliance.web.system import SystemController
from appliance.web.ui import ui_assets, ui_page

__all__ = ["create_app"]

DOCS_ASSETS = "/schema/assets"


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


async def refuse_cross_site(request: Request[Any, Any, Any]) -> None:
    """A web page the admin happens to visit must not drive the appliance: a browser's
    state-changing request from another origin is refused (API clients send no Origin)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden(
            f"refused a cross-site {request.method} from {origin}",
            hint="use the UI served by the appliance itself, or a client that is not a web page",
        )


def create_app(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def runtime_lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.runtime = Runtime.open(settings, with_engine=True)
        try:
            yield
        finally:
            app.state.runtime.close()

    # The docs page loads its scripts from this server, never from a CDN, so it works air-gapped.
    docs = SwaggerRenderPlugin(
        js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{DOCS_ASSETS}/favicon-32x32.png'>",
        path="/",
    )
    return Litestar(
        route_handlers=[
            ui_page,
            ui_assets,
            HealthController,
            pull_model,
            ModelsController,
            DownloadsController,
            SystemController,
            AuditController,
            EngineController,
            metrics,
            openai_router,
            ollama_router,
            create_static_files_router(
                path=DOCS_ASSETS, directories=[swagger_ui_bundle.swagger_ui_path], include_in_schema=False
            ),
        ],
        lifespan=[runtime_lifespan],
        dependencies={
            "store": Provide(provide_store, sync_to_thread=False),
            "models": Provide(provide_models, sync_to_thread=False),
            "provisioner": Provide(provide_provisioner, sync_to_thread=False),
            "preferences": Provide(provide_preferences, sync_to_thread=False),
            "context": Provide(provide_context, sync_to_thread=False),
            "inference": Provide(provide_inference, sync_to_thread=False),
            "pool": Provide(provide_pool, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=refuse_cross_site,
        # Only loopback names: a DNS-rebinding page on another name gets 400, never our API.
        allowed_hosts=AllowedHostsConfig(
            allowed_hosts=[
                name
                for host in {*LOOPBACK_NAMES, settings.host}
                for name in (host, f"{host}:{settings.port}")
            ]
        ),
        openapi_config=OpenAPIConfig(
            title="Appliance", version=__version__, path="/schema", render_plugins=[docs]
        ),
    )
