"""What handlers get injected: the services opened in the lifespan, and the request's audit context.

Imports services only (never the store or the cache): the web layer reaches data through them.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from litestar import Request
from litestar.datastructures import State

from appliance.audit import AuditService, Context
from appliance.engine.router import Router
from appliance.engine.service import InferenceService
from appliance.models.create import ModelCreator
from appliance.models.service import ModelService
from appliance.preferences import PreferenceService
from appliance.provision.service import Provisioner
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.web.guards import request_actor

__all__ = [
    "provide_audit",
    "provide_context",
    "provide_creator",
    "provide_inference",
    "provide_models",
    "provide_preferences",
    "provide_provisioner",
    "provide_router",
    "provide_settings",
]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _runtime(state: State) -> Runtime:
    runtime: Runtime = state.runtime
    return runtime


def provide_audit(state: State) -> AuditService:
    return AuditService(_runtime(state).store)


def provide_models(state: State) -> ModelService:
    return _runtime(state).models


def provide_creator(state: State) -> ModelCreator:
    return ModelCreator(_runtime(state).models)


def provide_settings(state: State) -> Settings:
    return _runtime(state).settings


def provide_preferences(state: State) -> PreferenceService:
    return _runtime(state).preferences


def provide_provisioner(state: State) -> Provisioner:
    return _runtime(state).provisioner


def provide_inference(state: State) -> InferenceService:
    inference = _runtime(state).inference
    assert inference is not None, "the server always opens the runtime with its engine"
    return inference


def provide_router(state: State) -> Router:
    router = _runtime(state).router
    assert router is not None, "the server always opens the runtime with its engine"
    return router


def provide_context(request: Request[Any, Any, Any]) -> Context:
    """The actor the guard identified; correlation id from X-Request-ID when sane."""
    given = request.headers.get("x-request-id", "")
    correlation_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    return Context(request_actor(request), correlation_id)
