"""Preferences: the settings an admin may change while the appliance runs (from the UI, the API or
the CLI). A preference overrides the setting of the same key; unsetting it falls back to the
setting. Each key has a type, so a bad value is refused with the reason and nothing is stored.

Services read a preference with ``PreferenceService.effective(KEY)``: the keys are typed objects
(``effective(MAX_BYTES)`` is an ``int | None``), so a misspelt key is a NameError or a mypy error,
never a silent fall-back to the setting. May import: settings, errors, audit, store.base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, cast

from pydantic import Field, TypeAdapter, ValidationError

from appliance.audit import Context, audited
from appliance.errors import InvalidSetting
from appliance.settings import ByteSize, Settings
from appliance.store.base import Store

__all__ = [
    "ALLOWED_PROVIDERS",
    "ALLOWED_ROLES",
    "ALLOWED_SOURCES",
    "CONTEXT_LENGTH",
    "DENIED_SOURCES",
    "EDITABLE",
    "EVICT_POLICY",
    "MAX_BYTES",
    "OFFLINE",
    "PREFER_LOCAL",
    "REQUIRE_APPROVAL",
    "Key",
    "Preference",
    "PreferenceService",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class Key(Generic[T_co]):
    """A preference: its key (also the dotted path of the setting it overrides), its type, its help."""

    name: str
    adapter: TypeAdapter[Any]  # what a stored value must be (the setting may also be None)
    description: str
    # on when the setting or the preference says so: a stored preference never turns --offline off
    either: bool = False

    def setting(self, settings: Settings) -> T_co:
        value: Any = settings
        for part in self.name.split("."):
            value = getattr(value, part)
        return cast(T_co, value)


MAX_BYTES: Key[int | None] = Key(
    "models.cache.max_bytes",
    TypeAdapter(ByteSize),
    "Cache budget in bytes, or a size like '500GB'; Reset goes back to the setting.",
)
EVICT_POLICY: Key[Literal["lru", "none"]] = Key(
    "models.cache.evict_policy",
    TypeAdapter(Literal["lru", "none"]),
    "'lru' evicts least recently used unpinned models; 'none' refuses.",
)
ALLOWED_SOURCES: Key[list[str]] = Key(
    "models.download.allowed_sources",
    TypeAdapter(list[str]),
    "Sources pulls may use: a scheme ('https') or scheme://host.",
)
DENIED_SOURCES: Key[list[str]] = Key(
    "models.download.denied_sources", TypeAdapter(list[str]), "Sources refused even when allowed."
)
REQUIRE_APPROVAL: Key[bool] = Key(
    "models.download.require_user_approval",
    TypeAdapter(bool),
    "Pulls wait as pending until an admin approves them.",
)
ALLOWED_ROLES: Key[list[Literal["admin", "user", "node"]]] = Key(
    "models.download.allowed_roles",
    TypeAdapter(list[Literal["admin", "user", "node"]]),
    "Roles that may pull when auth is on (admins always may).",
)
OFFLINE: Key[bool] = Key(
    "offline",
    TypeAdapter(bool),
    "No outbound network call at all (on when either this or the setting says so).",
    either=True,
)
CONTEXT_LENGTH: Key[int] = Key(
    "engine.context_length",
    TypeAdapter(Annotated[int, Field(ge=64)]),
    "Tokens of context per request, capped at the model's own.",
)
PREFER_LOCAL: Key[bool] = Key(
    "model_routing.prefer_local",
    TypeAdapter(bool),
    "Serve from a local engine or a worker when one can; an allowed external provider only when none"
    " fits. Off: an allowed provider that serves the model goes first.",
)
ALLOWED_PROVIDERS: Key[list[str]] = Key(
    "model_routing.allowed_external_providers",
    TypeAdapter(list[str]),
    "External providers routing may send model calls to, by name ('*': every configured one); empty: none.",
)

EDITABLE: dict[str, Key[Any]] = {
    key.name: key
    for key in (
        MAX_BYTES,
        EVICT_POLICY,
        ALLOWED_SOURCES,
        DENIED_SOURCES,
        REQUIRE_APPROVAL,
        ALLOWED_ROLES,
        OFFLINE,
        CONTEXT_LENGTH,
        PREFER_LOCAL,
        ALLOWED_PROVIDERS,
    )
}


@dataclass(frozen=True)
class Preference:
    key: str
    value: Any  # in effect: the preference when set, else the setting
    setting: Any  # what the settings (flags, environment, config file, defaults) say
    overridden: bool
    description: str


class PreferenceService:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def effective(self, key: Key[T]) -> T:
        """The value in effect: the preference when one is stored, else the setting."""
        return self._effective(key, self.store.get_preference(key.name))

    def _effective(self, key: Key[T], stored: Any) -> T:
        setting = key.setting(self.settings)
        if stored is None:
            return setting
        try:
            value = key.adapter.validate_python(stored)
        except ValidationError as exc:  # stored by another version, or by hand
            raise InvalidSetting(
                f"the stored preference {key.name} is invalid: {exc.errors()[0]['msg']}",
                hint=f"set it again or reset it: appliance prefs unset {key.name}",
            ) from exc
        return cast(T, bool(setting) or bool(value)) if key.either else cast(T, value)

    def list(self) -> list[Preference]:
        stored = self.store.list_preferences()
        return [self._describe(key, stored) for key in EDITABLE.values()]

    def _describe(self, key: Key[Any], stored: dict[str, Any]) -> Preference:
        return Preference(
            key.name,
            self._effective(key, stored.get(key.name)),
            key.setting(self.settings),
            key.name in stored,
            key.description,
        )

    def set(self, key: str, value: Any, context: Context) -> Preference:
        """Validate and store; ``None`` removes the preference, so the setting applies again."""
        editable = EDITABLE.get(key)
        if editable is None:
            raise InvalidSetting(
                f"{key!r} is not a preference", hint=f"preferences are: {', '.join(EDITABLE)}"
            )
        with audited(self.store, context, action="preferences.set", target=key) as note:
            if value is None:
                self.store.set_preference(key, None, actor=context.actor)
                note.detail["reset"] = True
            else:
                try:
                    checked = editable.adapter.validate_python(value)
                except ValidationError as exc:
                    problem = exc.errors()[0]["msg"]
                    raise InvalidSetting(
                        f"invalid value for {key}: {problem}", hint=editable.description
                    ) from exc
                self.store.set_preference(key, checked, actor=context.actor)
                note.detail["value"] = checked
            return self._describe(editable, self.store.list_preferences())
