"""Readiness: whether the appliance can answer an inference request, and if not, why not.

Inference paths (REQ-MODELS-0003, 0114): the local engine with a loadable model, a ready worker
with a model available, and an external provider that routing may use (allowed by
``model_routing.allowed_external_providers``) and that answered its last probe. Offline, no
provider counts, and no provider is probed: nothing leaves the box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.egress.types import EgressCalls, ProviderDirectory
from appliance.engine.routing import Policy
from appliance.models.service import ModelService
from appliance.preferences import PreferenceService

__all__ = ["OFFLINE_REASON", "ProviderState", "Readiness", "check_readiness", "provider_states"]

OFFLINE_REASON = "offline: external providers are off"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class ProviderState:
    """An external provider as readiness sees it; ``reachable`` is None where it was not probed
    (not allowed, or offline)."""

    name: str
    allowed: bool
    reachable: bool | None


def provider_states(
    providers: ProviderDirectory | None, egress: EgressCalls | None, preferences: PreferenceService
) -> tuple[list[ProviderState], bool]:
    """Each configured provider's state, and whether the appliance is offline. Only an allowed
    provider is probed (its probe is cached by the egress component: this stays cheap)."""
    configured = providers.list() if providers is not None else []
    if not configured:
        return [], False
    policy = Policy.read(preferences)
    states = []
    for provider in configured:
        allowed = policy.allows(provider)
        probed = allowed and not policy.offline and egress is not None
        states.append(
            ProviderState(provider.name, allowed, egress.reachable(provider) if probed and egress else None)
        )
    return states, policy.offline


def check_readiness(
    models: ModelService,
    *,
    engine_running: bool,
    worker_paths: int = 0,
    providers: Sequence[ProviderState] = (),
    offline: bool = False,
) -> Readiness:
    """Ready only once an inference path exists (REQ-MODELS-0114): never claim what cannot be served.

    The local engine with a loadable model is one; a ready worker with a model available
    (``worker_paths`` counts them) is another; an allowed, reachable provider a third."""
    reasons: list[str] = []
    if not engine_running:
        reasons.append("the inference engine is not running")
    if not models.has_loadable():
        reasons.append(
            "no loadable model and no external provider: import a GGUF model with"
            " `appliance models import ./model.gguf`"
            if not providers
            else "no loadable model: import a GGUF model with `appliance models import ./model.gguf`"
        )
        reasons.extend(_provider_reasons(providers, offline=offline))
    external = 0 if offline else sum(1 for state in providers if state.allowed and state.reachable)
    if reasons and engine_running and external:
        return Readiness(ready=True, reasons=())
    if reasons and worker_paths:
        return Readiness(ready=True, reasons=())
    return Readiness(ready=not reasons, reasons=tuple(reasons))


def _provider_reasons(providers: Sequence[ProviderState], *, offline: bool) -> list[str]:
    """Why no configured provider is an inference path (none when none is configured)."""
    if not providers:
        return []
    if offline:
        return [OFFLINE_REASON]
    allowed = [state for state in providers if state.allowed]
    if not allowed:
        names = ", ".join(state.name for state in providers)
        return [f"no external provider is allowed ({names}): model_routing.allowed_external_providers"]
    unreachable = [state.name for state in allowed if not state.reachable]
    if len(unreachable) == len(allowed):
        return [
            f"no allowed external provider is reachable ({', '.join(unreachable)}):"
            " `appliance providers test NAME` says why"
        ]
    return []
