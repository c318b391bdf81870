"""Readiness with external providers (REQ-MODELS-0003, 0114): a provider routing may use and that
answered its probe is an inference path; the reasons say why none is."""

from __future__ import annotations

import pytest

from appliance.health import ProviderState, check_readiness
from appliance.runtime import Runtime

REACHABLE = ProviderState("openai", allowed=True, reachable=True)
UNREACHABLE = ProviderState("lan", allowed=True, reachable=False)
NOT_ALLOWED = ProviderState("stranger", allowed=False, reachable=None)


@pytest.mark.parametrize(
    ("providers", "offline", "ready", "reason"),
    [
        ((), False, False, "no loadable model and no external provider: import a GGUF model"),
        ((REACHABLE,), False, True, None),
        ((UNREACHABLE, REACHABLE), False, True, None),
        ((UNREACHABLE,), False, False, "no allowed external provider is reachable (lan)"),
        ((NOT_ALLOWED,), False, False, "no external provider is allowed (stranger)"),
        ((REACHABLE,), True, False, "offline: external providers are off"),
    ],
)
def test_a_provider_is_an_inference_path_when_allowed_and_reachable(
    runtime: Runtime, providers: tuple[ProviderState, ...], offline: bool, ready: bool, reason: str | None
) -> None:
    readiness = check_readiness(runtime.models, engine_running=True, providers=providers, offline=offline)
    assert readiness.ready is ready
    if reason is None:
        assert readiness.reasons == ()
    else:
        assert any(reason in each for each in readiness.reasons), readiness.reasons


def test_a_provider_is_no_path_without_the_engine_that_calls_it(runtime: Runtime) -> None:
    readiness = check_readiness(runtime.models, engine_running=False, providers=(REACHABLE,))
    assert not readiness.ready
    assert "the inference engine is not running" in readiness.reasons
