"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State

from appliance.health import check_readiness
from appliance.models.service import ModelService

__all__ = ["HealthController"]


class HealthController(Controller):
    tags = ["health"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/healthz", sync_to_thread=False)
    def healthz(self) -> dict[str, str]:
        """Liveness: the process answers. Says nothing about models."""
        return {"status": "ok"}

    @get("/readyz", sync_to_thread=True)
    def readyz(self, models: ModelService, state: State) -> Response[dict[str, Any]]:
        """Readiness: 200 once an inference path exists; otherwise 503 with the reasons. Its
        details say whether script and commands tasks can run here (the sandbox), what holds
        them, and why not when not; prompt tasks need only the inference path."""
        nodes = state.runtime.nodes
        readiness = check_readiness(
            models,
            engine_running=state.runtime.router is not None,
            worker_paths=0 if nodes is None else nodes.inference_paths(),
        )
        sandbox = state.runtime.tasks.sandbox.capabilities().as_dict()
        body = {"ready": readiness.ready, "reasons": list(readiness.reasons), "details": {"sandbox": sandbox}}
        return Response(content=body, status_code=200 if readiness.ready else 503)
