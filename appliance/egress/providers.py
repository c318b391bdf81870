"""``ProviderService``: adding, listing, changing and removing external providers, and their keys.

A provider is a name, a wire format (``kind``), a base URL, the models it serves, and two
allow-lists: the operations it may be called for and the subjects calls may be made for. Its key
is write-only: it is sealed by ``KeyBox`` before it reaches the store, every surface shows only
``key_set``, and ``key(name)`` (the egress component's, nothing else's) opens it. Every change is
audited (``providers.add``, ``providers.update``, ``providers.key``, ``providers.remove``); no
audit row, message or log line holds a key.

Imports: settings, errors, audit, the store and ``egress.secrets`` / ``egress.types``.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from appliance.audit import Context, audited
from appliance.egress.secrets import KeyBox
from appliance.egress.types import KINDS, OPERATIONS, Operation, Provider, ProviderKind
from appliance.errors import InvalidInput, ProviderNotFound
from appliance.settings import Settings
from appliance.store.base import Store

__all__ = ["NAME_PATTERN", "ProviderOut", "ProviderService", "parse_list"]

NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,62}$"
_NAME = re.compile(NAME_PATTERN)
_MAX_URL = 2048
_MAX_MODEL = 200
_MAX_KEY = 4096
_ROLES = ("admin", "user")  # the roles calls are made for (a node never asks for a generation)
_SUBJECT_HINT = "each subject is *, role:admin, role:user, user:NAME, key:NAME or task"


class ProviderOut(BaseModel):
    """A provider as the API and ``--json`` show it: its key only as ``key_set``."""

    name: str
    kind: ProviderKind
    base_url: str
    models: list[str]
    operations: list[Operation]
    subjects: list[str]
    key_set: bool
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, provider: Provider) -> ProviderOut:
        return cls(
            name=provider.name,
            kind=provider.kind,
            base_url=provider.base_url,
            models=list(provider.models),
            operations=list(provider.operations),
            subjects=list(provider.subjects),
            key_set=provider.key_set,
            created_at=provider.created_at,
            updated_at=provider.updated_at,
        )


def parse_list(text: str) -> list[str]:
    """``a,b , c`` as ``["a", "b", "c"]`` (the CLI's form of a list)."""
    return [part.strip() for part in text.split(",") if part.strip()]


class ProviderService:
    """The configured providers (a ``ProviderDirectory`` for routing) and their sealed keys."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.box = KeyBox.open(settings)

    def add(
        self,
        name: str,
        *,
        kind: str,
        base_url: str,
        models: Iterable[str] = (),
        operations: Iterable[str] = OPERATIONS,
        subjects: Iterable[str] = ("*",),
        key: str | None,
        context: Context,
    ) -> Provider:
        """Add a provider (with its key, if it needs one); ProviderExists for a name taken."""
        provider = Provider(
            name=check_name(name),
            kind=check_kind(kind),
            base_url=check_base_url(base_url),
            models=check_models(models),
            operations=check_operations(operations),
            subjects=check_subjects(subjects),
        )
        ciphertext = None if key is None else self.box.seal(check_key(key))
        with audited(self.store, context, action="providers.add", target=provider.name) as note:
            note.detail.update(_detail(provider), key="set" if key is not None else "unset")
            return self.store.add_provider(provider, ciphertext)

    def update(
        self,
        name: str,
        *,
        base_url: str | None = None,
        models: Iterable[str] | None = None,
        operations: Iterable[str] | None = None,
        subjects: Iterable[str] | None = None,
        context: Context,
    ) -> Provider:
        """Change what is given (None leaves a field as it is); its name, kind and key stay."""
        changes = _changes(base_url=base_url, models=models, operations=operations, subjects=subjects)
        if not changes:
            raise InvalidInput(
                f"nothing to change in provider {name!r}",
                hint="give a new base URL, models, operations or subjects (the key is set on its own)",
            )
        return self._update(name, changes, context)

    def change(
        self,
        name: str,
        *,
        base_url: str | None = None,
        models: Iterable[str] | None = None,
        operations: Iterable[str] | None = None,
        subjects: Iterable[str] | None = None,
        key: str | None = None,
        key_given: bool = False,
        context: Context,
    ) -> Provider:
        """``update`` and, when ``key_given``, ``set_key`` (None clears) in one, for the API and the
        CLI: everything is checked before anything changes."""
        changes = _changes(base_url=base_url, models=models, operations=operations, subjects=subjects)
        checked_key = check_key(key) if key is not None else None
        if not changes and not key_given:
            raise InvalidInput(
                f"nothing to change in provider {name!r}",
                hint="give a new base URL, models, operations, subjects or key",
            )
        changed = self._update(name, changes, context) if changes else self.get(name)
        return self.set_key(name, checked_key, context) if key_given else changed

    def _update(self, name: str, changes: dict[str, Any], context: Context) -> Provider:
        current = self.get(name)
        with audited(self.store, context, action="providers.update", target=name) as note:
            note.detail.update({field: _shown(value) for field, value in changes.items()})
            return self.store.update_provider(replace(current, **changes))

    def set_key(self, name: str, key: str | None, context: Context) -> Provider:
        """Set its key (sealed) or, with None, clear it: a provider on the LAN may need none."""
        ciphertext = None if key is None else self.box.seal(check_key(key))
        with audited(self.store, context, action="providers.key", target=name) as note:
            note.detail["key"] = "set" if key is not None else "cleared"
            return self.store.set_provider_key(name, ciphertext)

    def get(self, name: str) -> Provider:
        found = self.store.get_provider(name)
        if found is None:
            raise ProviderNotFound(f"no provider named {name!r}")
        return found

    def list(self) -> builtins.list[Provider]:
        """Every provider, by name: one query (routing reads it per request)."""
        return self.store.list_providers()

    def remove(self, name: str, context: Context) -> None:
        """Remove it and its key; ProviderNotFound when there is none."""
        with audited(self.store, context, action="providers.remove", target=name):
            if not self.store.remove_provider(name):
                raise ProviderNotFound(f"no provider named {name!r}")

    def key(self, name: str) -> str | None:
        """Its key in clear, for the egress component alone (no other caller: nothing may show
        it); None when it has none. ProviderKeyUnreadable when the key that sealed it is gone."""
        ciphertext = self.store.provider_ciphertext(name)
        return None if ciphertext is None else self.box.unseal(ciphertext)


def _changes(
    *,
    base_url: str | None,
    models: Iterable[str] | None,
    operations: Iterable[str] | None,
    subjects: Iterable[str] | None,
) -> dict[str, Any]:
    """The fields given, checked (a field None is left as it is)."""
    changes: dict[str, Any] = {}
    if base_url is not None:
        changes["base_url"] = check_base_url(base_url)
    if models is not None:
        changes["models"] = check_models(models)
    if operations is not None:
        changes["operations"] = check_operations(operations)
    if subjects is not None:
        changes["subjects"] = check_subjects(subjects)
    return changes


def _detail(provider: Provider) -> dict[str, object]:
    return {
        "kind": provider.kind,
        "base_url": provider.base_url,
        "models": list(provider.models),
        "operations": list(provider.operations),
        "subjects": list(provider.subjects),
    }


def _shown(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


# -- checks: each says what was wrong and what to write instead ---------------------------------


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"{name!r} is not a provider name",
            hint="use 1 to 63 lower-case letters, digits and . _ -, starting with a letter or digit "
            "(no '/': a model is asked for as provider/model)",
        )
    return name


def check_kind(kind: str) -> ProviderKind:
    for known in KINDS:
        if kind == known:
            return known
    raise InvalidInput(f"{kind!r} is not a provider kind", hint=f"kinds are: {', '.join(KINDS)}")


def check_base_url(url: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment; without a trailing '/'."""
    hint = "write it like https://api.openai.com/v1 or http://192.168.1.20:8000/v1"
    if not _is_word(url, limit=_MAX_URL):
        raise InvalidInput(f"{url[:100]!r} is not a base URL", hint=hint)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port out of range)
    except ValueError as exc:
        raise InvalidInput(f"{url!r} is not a base URL: {exc}", hint=hint) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{url!r} is not an http(s) URL with a host", hint=hint)
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            "a base URL may not carry a user or password",
            hint="give the key with --key-stdin (the API's `key` field) instead: it is stored encrypted",
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise InvalidInput(f"{url!r} has a query or fragment, which a base URL may not", hint=hint)
    return url.rstrip("/")


def _is_word(text: str, *, limit: int) -> bool:
    return 0 < len(text) <= limit and not any(ch.isspace() or not ch.isprintable() for ch in text)


def check_models(models: Iterable[str]) -> tuple[str, ...]:
    checked: list[str] = []
    for model in models:
        if not _is_word(model, limit=_MAX_MODEL):
            raise InvalidInput(
                f"{model[:100]!r} is not a model name",
                hint=f"model names are 1 to {_MAX_MODEL} characters without spaces, e.g. gpt-4o",
            )
        if model not in checked:
            checked.append(model)
    return tuple(checked)


def check_operations(operations: Iterable[str]) -> tuple[Operation, ...]:
    given = builtins.list(operations)
    unknown = [op for op in given if op not in OPERATIONS]
    if unknown:
        raise InvalidInput(
            f"{', '.join(repr(op) for op in unknown)}: not an operation",
            hint=f"operations are: {', '.join(OPERATIONS)}",
        )
    if not given:
        raise InvalidInput(
            "a provider needs at least one operation",
            hint=f"operations are: {', '.join(OPERATIONS)}; to stop using a provider, remove it",
        )
    return tuple(op for op in OPERATIONS if op in given)


def check_subjects(subjects: Iterable[str]) -> tuple[str, ...]:
    checked: list[str] = []
    for subject in subjects:
        kind, _, rest = subject.partition(":")
        valid = (
            subject in ("*", "task")
            or (kind == "role" and rest in _ROLES)
            or (kind in ("user", "key") and _is_word(rest, limit=100))
        )
        if not valid:
            raise InvalidInput(f"{subject[:100]!r} is not a subject", hint=_SUBJECT_HINT)
        if subject not in checked:
            checked.append(subject)
    if not checked:
        raise InvalidInput(
            "a provider needs at least one subject",
            hint=f"{_SUBJECT_HINT}; to stop using a provider, remove it",
        )
    return tuple(checked)


def check_key(key: str) -> str:
    """A provider key as sent in a header: one line of printable characters (never echoed)."""
    key = key.strip()
    if not key:
        raise InvalidInput(
            "the provider key is empty",
            hint="give the key, or clear it (`--clear-key`, or `key: null` in the API)",
        )
    if not _is_word(key, limit=_MAX_KEY):
        raise InvalidInput(
            "the provider key is not one line of printable characters without spaces",
            hint=f"paste the key exactly as the provider gave it (at most {_MAX_KEY} characters)",
        )
    return key
