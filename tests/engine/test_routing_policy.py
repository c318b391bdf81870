"""The routing policy, rule by rule (REQ-MODELS-0112, 0115, 0116, 0117, 0118): local when a local
path fits, an allowed provider when none does or when the caller names it, a refusal with the
reason otherwise. Pure: every row is a decision and the reason it records."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.egress.types import Operation, Provider
from appliance.engine.routing import Policy, decide, split_name
from appliance.errors import (
    ApplianceError,
    EgressDenied,
    EngineBusy,
    ExternalDenied,
    InvalidModelName,
    ModelNotFound,
    ModelNotLoadable,
    NotReady,
    Offline,
    ProviderNotFound,
)

OPENAI = Provider("openai", "openai", "https://api.example/v1", models=("gpt-4o", "text-embed"))
CLAUDE = Provider(
    "claude", "anthropic", "https://anthropic.example", models=("claude-x",), operations=("chat",)
)
ANY = Provider("lan", "openai", "http://10.0.0.2:8000/v1")  # no models listed: serves any name
PROVIDERS = (OPENAI, CLAUDE, ANY)

MISSING = ModelNotFound("model gpt-4o:latest not found")
BUSY = EngineBusy("1 requests are already waiting for this model")
ALL = Policy(allowed=("*",))


def route(
    name: str,
    *,
    local: ApplianceError | None = MISSING,
    policy: Policy = ALL,
    providers: tuple[Provider, ...] = PROVIDERS,
    operation: Operation = "chat",
    named: str | None = None,
) -> tuple[str | None, str, str]:
    decision = decide(name, operation=operation, providers=providers, policy=policy, local=local, named=named)
    return (decision.provider.name if decision.provider else None), decision.model, decision.reason


@pytest.mark.parametrize(
    ("name", "arguments", "provider", "model", "reason"),
    [
        # a local path that fits serves, whatever providers could (0112, 0115)
        ("tiny", {"local": None}, None, "tiny", ""),
        ("gpt-4o", {"local": None}, None, "gpt-4o", ""),
        # not local: the allowed provider that lists the model goes before one that serves any name
        (
            "gpt-4o",
            {},
            "openai",
            "gpt-4o",
            "model gpt-4o is not in the local registry; provider openai allowed by"
            " model_routing.allowed_external_providers",
        ),
        (
            "claude-x",
            {},
            "claude",
            "claude-x",
            "model claude-x is not in the local registry; provider claude",
        ),
        ("llama-70b", {}, "lan", "llama-70b", "model llama-70b is not in the local registry; provider lan"),
        # allowed by name, not "*": the others are passed over
        ("gpt-4o", {"policy": Policy(allowed=("lan",))}, "lan", "gpt-4o", "provider lan allowed"),
        # a name that could not even be a local one
        (
            "Claude@X",
            {"local": InvalidModelName("invalid model name")},
            "lan",
            "Claude@X",
            "not in the local",
        ),
        # no local path fits for another reason: the reason says which
        (
            "big",
            {"local": ModelNotLoadable("model big:latest has no GGUF file (safetensors)")},
            "lan",
            "big",
            "model big cannot be served locally (model big:latest has no GGUF file (safetensors));"
            " provider lan",
        ),
        (
            "tiny",
            {"local": NotReady("no worker can serve tiny:latest: this server only coordinates")},
            "lan",
            "tiny",
            "cannot be served locally (no worker can serve tiny:latest",
        ),
        # the local queue is full: fallback (0115)
        ("tiny", {"local": BUSY}, "lan", "tiny", "the local queue for tiny is full; provider lan allowed"),
        # prefer_local off: an allowed provider that serves the name goes first
        (
            "gpt-4o",
            {"local": None, "policy": Policy(prefer_local=False, allowed=("*",))},
            "openai",
            "gpt-4o",
            "model_routing.prefer_local is false: provider openai serves gpt-4o and is allowed",
        ),
        # ... and when none is allowed, or offline, local still serves
        ("gpt-4o", {"local": None, "policy": Policy(prefer_local=False)}, None, "gpt-4o", ""),
        (
            "gpt-4o",
            {"local": None, "policy": Policy(prefer_local=False, allowed=("*",), offline=True)},
            None,
            "gpt-4o",
            "",
        ),
        # the caller names a provider: by the name's prefix or the header (0116), even when local fits
        (
            "openai/gpt-4o",
            {"local": None},
            "openai",
            "gpt-4o",
            "the model name openai/gpt-4o names provider openai",
        ),
        ("lan/org/model:7b", {}, "lan", "org/model:7b", "names provider lan, allowed by"),
        ("gpt-4o", {"local": None, "named": "openai"}, "openai", "gpt-4o", "the X-Appliance-Provider header"),
        ("openai/gpt-4o", {"named": "openai"}, "openai", "gpt-4o", "the X-Appliance-Provider header"),
        (
            "whatever",
            {"named": "lan"},
            "lan",
            "whatever",
            "the X-Appliance-Provider header names provider lan",
        ),
        # a prefix that is no provider's name is part of a local name
        ("library/tiny", {"local": None}, None, "library/tiny", ""),
        # embeddings go to a provider that allows them
        ("text-embed", {"operation": "embed"}, "openai", "text-embed", "provider openai allowed"),
        ("claude-x", {"operation": "embed"}, "lan", "claude-x", "provider lan allowed"),
    ],
)
def test_a_decision_and_its_reason(
    name: str, arguments: dict[str, Any], provider: str | None, model: str, reason: str
) -> None:
    decided = route(name, **arguments)
    assert decided[:2] == (provider, model)
    assert reason in decided[2]
    assert bool(decided[2]) is (provider is not None)  # every external route says why


@pytest.mark.parametrize(
    ("name", "arguments", "error", "message"),
    [
        # only providers that are not allowed serve it (0117)
        (
            "gpt-4o",
            {"policy": Policy()},
            ExternalDenied,
            "model gpt-4o is not in the local registry; only provider(s) openai, lan serve it, and"
            " model_routing.allowed_external_providers does not allow them",
        ),
        (
            "claude-x",
            {"policy": Policy(allowed=("openai",)), "providers": (OPENAI, CLAUDE)},
            ExternalDenied,
            "claude",
        ),
        # the caller names a provider that is not allowed
        ("openai/gpt-4o", {"policy": Policy(allowed=("lan",))}, ExternalDenied, "which model_routing"),
        (
            "gpt-4o",
            {"named": "claude", "policy": Policy(allowed=("openai",))},
            ExternalDenied,
            "header names",
        ),
        # ... one that does not serve the model, or not the operation
        (
            "openai/gpt-5",
            {},
            ModelNotFound,
            "provider openai does not serve model gpt-5 (it serves gpt-4o, text-embed)",
        ),
        ("claude/claude-x", {"operation": "embed"}, EgressDenied, "provider claude does not allow embed"),
        # ... or none at all
        ("gpt-4o", {"named": "nope"}, ProviderNotFound, "no external provider is named 'nope'"),
        # nothing serves it: the local refusal, saying providers were asked too
        (
            "ghost",
            {"providers": (OPENAI,)},
            ModelNotFound,
            "model gpt-4o:latest not found, and no external provider serves it",
        ),
        ("ghost", {"providers": ()}, ModelNotFound, "model gpt-4o:latest not found"),
        (
            "big",
            {"local": ModelNotLoadable("no GGUF file"), "providers": ()},
            ModelNotLoadable,
            "no GGUF file",
        ),
        ("tiny", {"local": BUSY, "providers": (OPENAI,)}, EngineBusy, "already waiting"),
        (
            "tiny",
            {"local": BUSY, "policy": Policy()},
            ExternalDenied,
            "the local queue for tiny is full; only",
        ),
        # offline: nothing goes out, and the refusal says so
        (
            "gpt-4o",
            {"policy": Policy(allowed=("*",), offline=True)},
            Offline,
            "offline: external providers are off",
        ),
        (
            "openai/gpt-4o",
            {"policy": Policy(allowed=("*",), offline=True)},
            Offline,
            "external providers are off",
        ),
        (
            "tiny",
            {"local": BUSY, "policy": Policy(allowed=("*",), offline=True)},
            Offline,
            "queue for tiny is full",
        ),
    ],
)
def test_a_refusal_and_its_reason(
    name: str, arguments: dict[str, Any], error: type[ApplianceError], message: str
) -> None:
    with pytest.raises(error) as refused:
        route(name, **arguments)
    assert message in refused.value.message


def test_a_model_nothing_serves_hints_at_providers() -> None:
    with pytest.raises(ModelNotFound) as refused:
        route("ghost", providers=())
    assert "appliance providers add" in refused.value.hint
    assert "model_routing.allowed_external_providers" in refused.value.hint


def test_a_busy_local_path_with_no_provider_is_the_same_refusal() -> None:
    with pytest.raises(EngineBusy) as refused:
        route("tiny", local=BUSY, providers=())
    assert refused.value is BUSY  # its Retry-After and message, as before providers existed


@pytest.mark.parametrize(
    ("name", "named", "expected"),
    [
        ("openai/gpt-4o", None, ("openai", "gpt-4o")),
        ("openai/", None, (None, "openai/")),
        ("other/gpt-4o", None, (None, "other/gpt-4o")),
        ("gpt-4o", None, (None, "gpt-4o")),
        ("gpt-4o", "claude", ("claude", "gpt-4o")),
        ("claude/claude-x", "claude", ("claude", "claude-x")),
        ("openai/gpt-4o", "lan", ("lan", "openai/gpt-4o")),  # the header wins; the name is the model's
    ],
)
def test_split_name(name: str, named: str | None, expected: tuple[str | None, str]) -> None:
    provider, model = split_name(name, PROVIDERS, named=named)
    assert (provider.name if provider else None, model) == expected
