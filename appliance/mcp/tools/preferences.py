"""MCP tools: the preferences an admin may change while the appliance runs (``appliance prefs``).

``preference.get`` shows one key as the settings page does (the value in effect, the setting, and
whether a preference overrides it); ``preference.effective`` only the value in effect and where it
comes from; ``preference.list`` every key. Each carries the key's JSON schema, so a caller knows
the value's type. An unknown key is an ``invalid_setting`` that names the known ones.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, Field

from appliance.errors import InvalidSetting
from appliance.mcp.limits import fit_list
from appliance.mcp.types import Tool, ToolCall, ToolInput, ToolOutput
from appliance.preferences import EDITABLE, Preference, PreferenceService

__all__ = ["TOOLS"]

_KEY = Field(
    description="A preference's key (its setting's dotted path).",
    json_schema_extra={"enum": list(EDITABLE)},
)


class KeyIn(ToolInput):
    key: str = _KEY


class ListIn(ToolInput):
    pass


class PreferenceItem(BaseModel):
    key: str
    value: Any = Field(description="The value in effect: the preference when set, else the setting.")
    setting: Any = Field(description="What the settings (flags, environment, config file, defaults) say.")
    overridden: bool = Field(description="A stored preference overrides the setting.")
    description: str
    value_schema: dict[str, Any] = Field(description="The JSON schema a stored value must meet.")

    @classmethod
    def of(cls, preference: Preference) -> PreferenceItem:
        schema = EDITABLE[preference.key].adapter.json_schema()
        return cls(**preference.__dict__, value_schema=schema)


class PreferenceOut(ToolOutput, PreferenceItem):
    pass


class EffectiveOut(ToolOutput):
    key: str
    value: Any = Field(description="The value in effect.")
    source: Literal["preference", "setting"] = Field(description="Where the value in effect comes from.")


class ListOut(ToolOutput):
    preferences: list[PreferenceItem]


def _preferences(call: ToolCall) -> PreferenceService:
    return call.runtime.preferences


def _one(service: PreferenceService, key: str) -> Preference:
    if key not in EDITABLE:
        raise InvalidSetting(f"{key!r} is not a preference", hint=f"preferences are: {', '.join(EDITABLE)}")
    return next(preference for preference in service.list() if preference.key == key)


async def _get(call: ToolCall, given: KeyIn) -> PreferenceOut:
    preference = await asyncio.to_thread(_one, _preferences(call), given.key)
    return PreferenceOut(**PreferenceItem.of(preference).model_dump())


async def _effective(call: ToolCall, given: KeyIn) -> EffectiveOut:
    preference = await asyncio.to_thread(_one, _preferences(call), given.key)
    source: Literal["preference", "setting"] = "preference" if preference.overridden else "setting"
    return EffectiveOut(key=preference.key, value=preference.value, source=source)


async def _list(call: ToolCall, given: ListIn) -> ListOut:
    preferences = await asyncio.to_thread(_preferences(call).list)
    return ListOut(preferences=[PreferenceItem.of(preference) for preference in preferences])


def _fit_list(output: ListOut, limit: int) -> ListOut:
    return fit_list(output, "preferences", limit)


TOOLS: list[Tool[Any, Any]] = [
    Tool(
        name="preference.get",
        title="Get a preference",
        description="One preference: the value in effect, the setting it overrides, whether it is "
        "overridden, and the JSON schema of its value.",
        input=KeyIn,
        output=PreferenceOut,
        run=_get,
    ),
    Tool(
        name="preference.list",
        title="List the preferences",
        description="Every preference an admin may change while the appliance runs, with the value "
        "in effect.",
        input=ListIn,
        output=ListOut,
        run=_list,
        fit=_fit_list,
    ),
    Tool(
        name="preference.effective",
        title="A preference's value in effect",
        description="The value a preference's key has now, and whether a stored preference or the "
        "setting gives it.",
        input=KeyIn,
        output=EffectiveOut,
        run=_effective,
    ),
]
