"""Loaded models over HTTP: ``/api/v1/ps``, load and unload, the routing log, and ``/metrics``.

Imports: the engine and its service (the routing log is ``InferenceService.history``), the cluster's
service (the nodes' heartbeat ages); never the store.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from pydantic import BaseModel, ConfigDict, Field

from appliance.cluster.service import ClusterService
from appliance.engine.router import Loaded, Router
from appliance.engine.service import InferenceService
from appliance.settings import Duration

__all__ = ["EngineController", "LoadIn", "metrics"]


class LoadIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    name: str
    keep_alive: Duration | None = Field(
        default=None, description="seconds, or a number with ms, s, m or h ('5m'); negative keeps it loaded"
    )
    context_length: int | None = Field(default=None, ge=1, description="tokens per sequence")


class UnloadIn(BaseModel):
    name: str


def describe_loaded(loaded: Loaded) -> dict[str, Any]:
    info = loaded.info
    return {
        "name": str(loaded.name),
        "digest": info.digest,
        "size_bytes": info.size_bytes,
        "memory_bytes": info.memory_bytes,
        "context_length": info.context_length,
        "gpu_layers": info.gpu_layers,
        "parallel": info.parallel,
        "active_requests": info.active_requests,
        "queued_requests": info.queued_requests,
        "loaded_at": info.loaded_at,
        "expires_in_seconds": info.expires_in,
    }


class EngineController(Controller):
    path = "/api/v1"
    tags = ["engine"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/ps", sync_to_thread=False)
    def ps(self, router: Router) -> dict[str, Any]:
        """Models loaded now, with memory, context and when they unload."""
        return {
            "models": [describe_loaded(loaded) for loaded in router.loaded()],
            "memory_budget_bytes": router.memory_budget,
            "gpu_offload": router.gpu_offload,
        }

    @post("/models/load", status_code=200, sync_to_thread=True)
    def load(self, data: LoadIn, router: Router) -> dict[str, Any]:
        """Load a model now (instead of on its first request); keep_alive as in Ollama."""
        loaded, _ = router.load(data.name, keep_alive=data.keep_alive, context_length=data.context_length)
        return describe_loaded(loaded)

    @post("/models/unload", status_code=200, sync_to_thread=True)
    def unload(self, data: UnloadIn, router: Router) -> dict[str, bool]:
        """Unload a model; requests in flight on it end with an error."""
        return {"unloaded": router.unload(data.name)}

    @get("/inference", sync_to_thread=True)
    def inference_log(
        self,
        inference: InferenceService,
        model: str | None = None,
        limit: int = Parameter(default=100, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        """Served requests, newest first: which engine served each and why (REQ-MODELS-0118)."""
        return inference.history(model=model, limit=limit)


@get("/metrics", sync_to_thread=True, include_in_schema=False)
def metrics(state: State, cluster: ClusterService) -> Response[bytes]:
    """Prometheus text format; the nodes' heartbeat ages from the nodes list as it reads now (a
    store read: in a thread)."""
    ages = {
        n.name: n.seconds_since_heartbeat
        for n in cluster.list_nodes()
        if n.seconds_since_heartbeat is not None
    }
    rendered = state.runtime.metrics.render(ages)
    return Response(rendered, media_type="text/plain; version=0.0.4; charset=utf-8")
