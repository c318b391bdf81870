"""Loaded models over HTTP: ``/api/v1/ps``, load and unload, the routing log, and ``/metrics``.

Imports: the engine and its service (the routing log is ``InferenceService.history``), never the store.
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from pydantic import BaseModel, ConfigDict, Field

from appliance.engine.pool import EnginePool, LoadedModel
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


def describe_loaded(loaded: LoadedModel) -> dict[str, Any]:
    expires_in = None if loaded.expires_at is None else max(0.0, loaded.expires_at - time.monotonic())
    return {
        "name": str(loaded.name),
        "digest": loaded.digest,
        "size_bytes": loaded.size_bytes,
        "memory_bytes": loaded.memory_bytes,
        "context_length": loaded.seq_ctx,
        "gpu_layers": loaded.gpu_layers,
        "active_requests": loaded.batcher.active,
        "queued_requests": loaded.batcher.queued,
        "loaded_at": loaded.loaded_at,
        "expires_in_seconds": expires_in,
    }


class EngineController(Controller):
    path = "/api/v1"
    tags = ["engine"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/ps", sync_to_thread=False)
    def ps(self, pool: EnginePool) -> dict[str, Any]:
        """Models loaded now, with memory, context and when they unload."""
        return {
            "models": [describe_loaded(loaded) for loaded in pool.loaded()],
            "memory_budget_bytes": pool.budget,
            "gpu_offload": pool.gpu_offload,
        }

    @post("/models/load", status_code=200, sync_to_thread=True)
    def load(self, data: LoadIn, pool: EnginePool) -> dict[str, Any]:
        """Load a model now (instead of on its first request); keep_alive as in Ollama."""
        loaded = pool.load(data.name, keep_alive=data.keep_alive, context_length=data.context_length)
        return describe_loaded(loaded)

    @post("/models/unload", status_code=200, sync_to_thread=True)
    def unload(self, data: UnloadIn, pool: EnginePool) -> dict[str, bool]:
        """Unload a model; requests in flight on it end with an error."""
        return {"unloaded": pool.unload(data.name)}

    @get("/inference", sync_to_thread=True)
    def inference_log(
        self,
        inference: InferenceService,
        model: str | None = None,
        limit: int = Parameter(default=100, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        """Served requests, newest first: which engine served each and why (REQ-MODELS-0118)."""
        return inference.history(model=model, limit=limit)


@get("/metrics", sync_to_thread=False, include_in_schema=False)
def metrics(state: State) -> Response[bytes]:
    """Prometheus text format."""
    return Response(state.runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
