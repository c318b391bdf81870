"""A router over a real in-process pool, on a test runtime's registry, store and cache."""

from __future__ import annotations

from appliance.engine.pool import EnginePool
from appliance.engine.router import Router
from appliance.runtime import Runtime
from appliance.settings import EngineSettings


def make_router(runtime: Runtime, **settings: object) -> Router:
    engine_settings = EngineSettings(**settings)  # type: ignore[arg-type]
    engine = EnginePool(engine_settings)
    return Router(
        engine_settings,
        runtime.models,
        store=runtime.store,
        cache=runtime.cache,
        preferences=runtime.preferences,
        engine=engine,
    )
