"""Readiness: whether the appliance can answer an inference request, and if not, why not."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.models.service import ModelService

__all__ = ["Readiness", "check_readiness"]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


def check_readiness(models: ModelService, *, engine_running: bool, worker_paths: int = 0) -> Readiness:
    """Ready only once an inference path exists (REQ-MODELS-0114): never claim what cannot be served.

    The local engine with a loadable model is one; a ready worker with a model available
    (``worker_paths`` counts them) is another."""
    reasons: list[str] = []
    if not engine_running:
        reasons.append("the inference engine is not running")
    if not models.has_loadable():
        reasons.append(
            "no loadable model and no external provider: import a GGUF model with"
            " `appliance models import ./model.gguf`"
        )
    if reasons and worker_paths:
        return Readiness(ready=True, reasons=())
    return Readiness(ready=not reasons, reasons=tuple(reasons))
