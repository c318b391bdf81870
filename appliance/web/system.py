"""``/api/v1/system`` and ``/api/v1/preferences``: what the dashboard and the settings page show."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, put
from litestar.datastructures import State
from pydantic import BaseModel

from appliance import hostinfo
from appliance.audit import Context
from appliance.engine.sizing import engine_choices
from appliance.health import provider_states
from appliance.preferences import Preference, PreferenceService
from appliance.runtime import Runtime
from appliance.settings import secret_states

__all__ = ["SystemController"]


class PreferenceIn(BaseModel):
    value: Any = None  # null removes the preference: the setting applies again


class PreferenceOut(BaseModel):
    key: str
    value: Any
    setting: Any
    overridden: bool
    description: str

    @classmethod
    def of(cls, preference: Preference) -> PreferenceOut:
        return cls(**preference.__dict__)


class SystemController(Controller):
    path = "/api/v1"
    tags = ["system"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/system", sync_to_thread=True)
    def system(self, state: State) -> dict[str, Any]:
        """CPU, memory, GPUs and VRAM, the cache against its budget, the data dir's free space,
        which secret settings are set (never their values), and each external provider's state
        (allowed by routing, reachable: as /readyz counts them)."""
        runtime: Runtime = state.runtime
        facts = hostinfo.report(runtime.settings.data_dir)
        providers, _ = provider_states(runtime.providers, runtime.egress, runtime.preferences)
        return {
            **facts,
            "engine": engine_choices(runtime.settings.engine, gpu_offload=facts["gpu_offload"]),
            "cache": runtime.models.cache_usage(),
            "secrets": secret_states(runtime.settings),
            "providers": [provider.__dict__ for provider in providers],
        }

    @get("/preferences", sync_to_thread=True)
    def list_preferences(self, preferences: PreferenceService) -> list[PreferenceOut]:
        """Every preference with the value in effect and the setting it overrides."""
        return [PreferenceOut.of(preference) for preference in preferences.list()]

    @put("/preferences/{key:str}", sync_to_thread=True)
    def set_preference(
        self, key: str, data: PreferenceIn, preferences: PreferenceService, context: Context
    ) -> PreferenceOut:
        """Set a preference (validated against its type), or remove it with ``{"value": null}``."""
        return PreferenceOut.of(preferences.set(key, data.value, context))
