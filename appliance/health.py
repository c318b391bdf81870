"""Readiness: whether the appliance can answer an inference request, and if not, why not."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.models.service import ModelService

__all__ = ["Readiness", "check_readiness"]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


def check_readiness(models: ModelService, *, engine_running: bool) -> Readiness:
    """Ready only once an inference path exists (REQ-MODELS-0114): never claim what cannot be served."""
    reasons: list[str] = []
    if not engine_running:
        reasons.append("the inference engine is not running")
    if not models.has_loadable():
        reasons.append(
            "no loadable model and no external provider: import a GGUF model with"
            " `appliance models import ./model.gguf`"
        )
    return Readiness(ready=not reasons, reasons=tuple(reasons))
