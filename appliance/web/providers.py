"""``/api/v1/providers``: external providers over HTTP, for admins (``providers.read``,
``providers.manage``). A key goes in (``key`` on create, and on change: a string sets it, null
clears it, absent leaves it) and never comes out: every answer carries ``key_set`` only.

Imports: the provider service, the egress (for a test) and audit.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import Provide
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from appliance.audit import Context
from appliance.egress.client import Egress, ProbeResult
from appliance.egress.providers import NAME_PATTERN, ProviderOut, ProviderService
from appliance.egress.types import OPERATIONS, Operation, ProviderKind
from appliance.runtime import Runtime
from appliance.web.bodies import parse_body

__all__ = ["ProviderChange", "ProviderIn", "ProvidersController"]


def provide_providers(state: State) -> ProviderService:
    runtime: Runtime = state.runtime
    return runtime.providers


def provide_egress(state: State) -> Egress:
    runtime: Runtime = state.runtime
    return runtime.egress


class ProviderIn(BaseModel):
    """A new provider. Fields it does not know are refused, not dropped."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and . _ - (no '/')")
    kind: ProviderKind = "openai"
    base_url: str = Field(description="e.g. https://api.openai.com/v1 or https://api.anthropic.com")
    models: list[str] = Field(default_factory=list, description="the models it serves; empty: any name")
    operations: list[Operation] = Field(default_factory=lambda: list(OPERATIONS))
    subjects: list[str] = Field(
        default_factory=lambda: ["*"],
        description="whom calls may be made for: *, role:admin, role:user, user:NAME, key:NAME, task",
    )
    key: SecretStr | None = Field(default=None, description="its API key; stored encrypted, never shown")


class ProviderChange(BaseModel):
    """What to change: the fields given. ``key``: a string sets it, null clears it, absent leaves it.
    Its name and kind stay (remove it and add it again to change them)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None
    models: list[str] | None = None
    operations: list[Operation] | None = None
    subjects: list[str] | None = None
    key: SecretStr | None = None


def _plain(key: SecretStr | None) -> str | None:
    return None if key is None else key.get_secret_value()


def _add(providers: ProviderService, data: ProviderIn, context: Context) -> ProviderOut:
    added = providers.add(
        data.name,
        kind=data.kind,
        base_url=data.base_url,
        models=data.models,
        operations=data.operations,
        subjects=data.subjects,
        key=_plain(data.key),
        context=context,
    )
    return ProviderOut.of(added)


def _change(providers: ProviderService, name: str, data: ProviderChange, context: Context) -> ProviderOut:
    changed = providers.change(
        name,
        base_url=data.base_url,
        models=data.models,
        operations=data.operations,
        subjects=data.subjects,
        key=_plain(data.key),
        key_given="key" in data.model_fields_set,
        context=context,
    )
    return ProviderOut.of(changed)


class ProvidersController(Controller):
    path = "/api/v1/providers"
    tags = ["providers"]  # noqa: RUF012 (Litestar reads it as a class attribute)
    dependencies = {  # noqa: RUF012
        "providers": Provide(provide_providers, sync_to_thread=False),
        "egress": Provide(provide_egress, sync_to_thread=False),
    }

    @get("/", sync_to_thread=True)
    def list_providers(self, providers: ProviderService) -> list[ProviderOut]:
        """The configured providers, by name; a key only as ``key_set``."""
        return [ProviderOut.of(provider) for provider in providers.list()]

    @get("/{name:str}", sync_to_thread=True)
    def show_provider(self, name: str, providers: ProviderService) -> ProviderOut:
        return ProviderOut.of(providers.get(name))

    # The bodies are parsed here, not by Litestar: a failure in a body field named like one of
    # the app's dependencies (`models`) would be answered with a 500 there.
    @post("/", status_code=201)
    async def add_provider(
        self, request: Request[Any, Any, Any], providers: ProviderService, context: Context
    ) -> ProviderOut:
        """Add a provider (409 provider_exists for a name taken). Body: ProviderIn."""
        data = parse_body(ProviderIn, await request.body())
        return await anyio.to_thread.run_sync(lambda: _add(providers, data, context))

    @patch("/{name:str}")
    async def change_provider(
        self, name: str, request: Request[Any, Any, Any], providers: ProviderService, context: Context
    ) -> ProviderOut:
        """Change the fields given; a key set or cleared is audited as ``providers.key``. Body:
        ProviderChange."""
        data = parse_body(ProviderChange, await request.body())
        return await anyio.to_thread.run_sync(lambda: _change(providers, name, data, context))

    @delete("/{name:str}", status_code=204, sync_to_thread=True)
    def remove_provider(self, name: str, providers: ProviderService, context: Context) -> None:
        """Remove a provider and its key."""
        providers.remove(name, context)

    @post("/{name:str}/test", status_code=200)
    async def test_provider(
        self, name: str, providers: ProviderService, egress: Egress, context: Context
    ) -> ProbeResult:
        """Fetch its model list with its key: whether it answered (``ok``), its HTTP status, the
        models it lists, how long it took, and what went wrong (scrubbed of every key)."""
        provider = await anyio.to_thread.run_sync(providers.get, name)
        return await egress.probe(provider, context=context)
