"""Local or external: the routing policy as one pure function, so every rule is a table row in its
test (REQ-MODELS-0112, 0115, 0116, 0117).

The router asks it once it knows whether a local path fits (a node can serve the name and is not
overloaded); ``decide`` answers with the local path, an external provider, or a refusal saying why::

    the name or the header names a provider    that provider, when allowed (else external_denied)
    a local path fits                          local; with prefer_local off, an allowed provider first
    no local path fits                         the first allowed provider that serves the name
    only providers not allowed serve it        external_denied, naming them
    nothing serves it                          the local refusal (model_not_found says providers exist)
    offline                                    never external: the refusal says external providers are off

Among the allowed providers one that lists the model goes before one that serves any name, then
the directory's order. Imports: errors, the preferences' keys and the egress types (a
``Provider`` holds no key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.egress.types import Operation, Provider
from appliance.errors import (
    ApplianceError,
    EgressDenied,
    EngineBusy,
    ExternalDenied,
    InvalidModelName,
    ModelNotFound,
    Offline,
    ProviderNotFound,
)
from appliance.preferences import ALLOWED_PROVIDERS, OFFLINE, PREFER_LOCAL, PreferenceService

__all__ = ["ALLOW_LIST", "Decision", "Policy", "decide", "split_name"]

ALLOW_LIST = "model_routing.allowed_external_providers"
_OFFLINE = "offline: external providers are off"


@dataclass(frozen=True)
class Policy:
    """The preferences routing reads, as they are in effect for one request."""

    prefer_local: bool = True
    allowed: tuple[str, ...] = ()  # provider names; "*": every configured one
    offline: bool = False

    @classmethod
    def read(cls, preferences: PreferenceService) -> Policy:
        """The model_routing preferences (and offline) as they are in effect now."""
        return cls(
            prefer_local=preferences.effective(PREFER_LOCAL),
            allowed=tuple(preferences.effective(ALLOWED_PROVIDERS)),
            offline=preferences.effective(OFFLINE),
        )

    def allows(self, provider: Provider) -> bool:
        return "*" in self.allowed or provider.name in self.allowed


@dataclass(frozen=True)
class Decision:
    """Local (``provider`` None: the router's placement says where and why) or external, with the
    provider's own name of the model and the reasons, as the inference log records them."""

    provider: Provider | None
    model: str
    reason: str = ""


def split_name(
    name: str, providers: Sequence[Provider], *, named: str | None = None
) -> tuple[Provider | None, str]:
    """The provider a request names, if any, and the model's name for it: ``named`` (the
    X-Appliance-Provider header) or ``provider/model`` where the part before the first ``/`` is a
    configured provider's name. A header naming no configured provider is ProviderNotFound."""
    by_name = {provider.name: provider for provider in providers}
    if named is not None:
        provider = by_name.get(named)
        if provider is None:
            raise ProviderNotFound(f"no external provider is named {named!r} (X-Appliance-Provider)")
        prefix, _, rest = name.partition("/")
        return provider, rest if prefix == named and rest else name
    prefix, slash, rest = name.partition("/")
    if slash and rest and prefix in by_name:
        return by_name[prefix], rest
    return None, name


def decide(
    name: str,
    *,
    operation: Operation,
    providers: Sequence[Provider],
    policy: Policy,
    local: ApplianceError | None,
    named: str | None = None,
) -> Decision:
    """Where a request for ``name`` goes. ``local`` is None when a local path fits, else the error
    that says why none does (not registered, not loadable, no node, the queue full); ``named`` is the
    X-Appliance-Provider header. Raises the refusal, with the reason, when nothing may serve it."""
    target, model = split_name(name, providers, named=named)
    if target is not None:
        return _named(target, model, operation=operation, policy=policy, header=named is not None)
    offering = [
        provider for provider in providers if operation in provider.operations and provider.serves(name)
    ]
    # one that lists the model is a better match than one that serves any name
    offering.sort(key=lambda provider: not provider.models)
    allowed = [provider for provider in offering if policy.allows(provider)]
    if local is None:
        if policy.prefer_local or not allowed or policy.offline:
            return Decision(None, name)
        chosen = allowed[0]
        return Decision(
            chosen,
            name,
            f"model_routing.prefer_local is false: provider {chosen.name} serves {name} and is allowed by"
            f" {ALLOW_LIST}",
        )
    why = _not_local(name, local)
    if allowed:
        if policy.offline:
            raise Offline(f"{why}, and the appliance is {_OFFLINE}")
        chosen = allowed[0]
        return Decision(chosen, name, f"{why}; provider {chosen.name} allowed by {ALLOW_LIST}")
    if offering:
        names = ", ".join(provider.name for provider in offering)
        raise ExternalDenied(
            f"{why}; only provider(s) {names} serve it, and {ALLOW_LIST} does not allow them"
        )
    if isinstance(local, ModelNotFound):
        served = ", and no external provider serves it" if providers else ""
        raise ModelNotFound(
            f"{local.message}{served}",
            hint="list the models with `appliance models ls`; an external provider may serve it once an"
            f" admin adds one (`appliance providers add`) and allows it in {ALLOW_LIST}",
        )
    raise local


def _named(target: Provider, model: str, *, operation: Operation, policy: Policy, header: bool) -> Decision:
    how = "the X-Appliance-Provider header" if header else f"the model name {target.name}/{model}"
    if policy.offline:
        raise Offline(f"{how} names provider {target.name}, and the appliance is {_OFFLINE}")
    if not policy.allows(target):
        raise ExternalDenied(f"{how} names provider {target.name}, which {ALLOW_LIST} does not allow")
    if operation not in target.operations:
        allowed = ", ".join(target.operations)
        raise EgressDenied(f"provider {target.name} does not allow {operation} (its operations: {allowed})")
    if not target.serves(model):
        raise ModelNotFound(
            f"provider {target.name} does not serve model {model} (it serves {', '.join(target.models)})",
            hint="name one of its models, or an admin adds it:"
            f" `appliance providers set {target.name} --models ...`",
        )
    return Decision(target, model, f"{how} names provider {target.name}, allowed by {ALLOW_LIST}")


def _not_local(name: str, error: ApplianceError) -> str:
    """Why no local path fits, as the start of a route's reason."""
    if isinstance(error, ModelNotFound | InvalidModelName):
        return f"model {name} is not in the local registry"
    if isinstance(error, EngineBusy):
        return f"the local queue for {name} is full"
    return f"model {name} cannot be served locally ({error.message})"
