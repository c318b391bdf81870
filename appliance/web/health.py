"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State

from appliance.health import check_readiness, provider_states
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
        them, and why not when not; prompt tasks need only the inference path; and each external
        provider's state (allowed, reachable: probed only when allowed and not offline)."""
        runtime = state.runtime
        nodes = runtime.nodes
        providers, offline = provider_states(runtime.providers, runtime.egress, runtime.preferences)
        readiness = check_readiness(
            models,
            engine_running=runtime.router is not None,
            worker_paths=0 if nodes is None else nodes.inference_paths(),
            providers=providers,
            offline=offline,
        )
        sandbox = runtime.tasks.sandbox.capabilities().as_dict()
        details = {"sandbox": sandbox, "providers": [state.__dict__ for state in providers]}
        body = {"ready": readiness.ready, "reasons": list(readiness.reasons), "details": details}
        return Response(content=body, status_code=200 if readiness.ready else 503)
