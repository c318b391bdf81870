"""Preferences: the settings an admin may change while the appliance runs (from the UI, the API or
the CLI). A preference overrides the setting of the same key; unsetting it falls back to the
setting. Each key has a type, so a bad value is refused with the reason and nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from appliance.audit import Context, audited
from appliance.errors import InvalidSetting
from appliance.settings import ByteSize, Settings
from appliance.store.base import Store

__all__ = ["EDITABLE", "Preference", "PreferenceService"]


@dataclass(frozen=True)
class Editable:
    adapter: TypeAdapter[Any]
    description: str


EDITABLE: dict[str, Editable] = {
    "models.cache.max_bytes": Editable(
        TypeAdapter(ByteSize),
        "Cache budget in bytes, or a size like '500GB'; Reset goes back to the setting.",
    ),
    "models.cache.evict_policy": Editable(
        TypeAdapter(Literal["lru", "none"]),
        "'lru' evicts least recently used unpinned models; 'none' refuses.",
    ),
    "models.download.allowed_sources": Editable(
        TypeAdapter(list[str]), "Sources pulls may use: a scheme ('https') or scheme://host."
    ),
    "models.download.denied_sources": Editable(TypeAdapter(list[str]), "Sources refused even when allowed."),
    "models.download.require_user_approval": Editable(
        TypeAdapter(bool), "Pulls wait as pending until an admin approves them."
    ),
    "offline": Editable(
        TypeAdapter(bool), "No outbound network call at all (on when either this or the setting says so)."
    ),
    "engine.context_length": Editable(
        TypeAdapter(Annotated[int, Field(ge=64)]), "Tokens of context per request, capped at the model's own."
    ),
}


@dataclass(frozen=True)
class Preference:
    key: str
    value: Any  # in effect: the preference when set, else the setting
    setting: Any  # what the settings (flags, environment, config file, defaults) say
    overridden: bool
    description: str


def _setting(settings: Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


class PreferenceService:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def list(self) -> list[Preference]:
        stored = self.store.list_preferences()
        return [self._describe(key, stored) for key in EDITABLE]

    def _describe(self, key: str, stored: dict[str, Any]) -> Preference:
        setting = _setting(self.settings, key)
        overridden = key in stored
        return Preference(
            key, stored[key] if overridden else setting, setting, overridden, EDITABLE[key].description
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
            return self._describe(key, self.store.list_preferences())
