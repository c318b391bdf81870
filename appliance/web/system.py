"""``/api/v1/system`` and ``/api/v1/preferences``: what the dashboard and the settings page show."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from litestar import Controller, get, put
from litestar.datastructures import State
from pydantic import BaseModel

from appliance.audit import Context
from appliance.preferences import Preference, PreferenceService
from appliance.runtime import Runtime

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


def _memory() -> dict[str, int | None]:
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return {"total_bytes": fields.get("MemTotal"), "available_bytes": fields.get("MemAvailable")}


def _gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs as nvidia-smi reports them; none where it is missing."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        output = subprocess.run(
            [binary, "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in output.strip().splitlines():
        name, _, rest = line.partition(",")
        gpus.append({"name": name.strip(), **_vram(rest)})
    return gpus


def _vram(fields: str) -> dict[str, int | None]:
    """MiB as nvidia-smi prints them; some GPUs (unified memory) print [N/A] instead."""
    values: list[int | None] = []
    for field in fields.split(","):
        try:
            values.append(int(field.strip()) << 20)
        except ValueError:
            values.append(None)
    total, used = [*values, None, None][:2]
    return {"vram_total_bytes": total, "vram_used_bytes": used}


class SystemController(Controller):
    path = "/api/v1"
    tags = ["system"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/system", sync_to_thread=True)
    def system(self, state: State) -> dict[str, Any]:
        """CPU, memory, GPUs and VRAM, the cache against its budget, and the data dir's free space."""
        runtime: Runtime = state.runtime
        return {
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "memory": _memory(),
            "gpus": _gpus(),
            "gpu_offload": runtime.pool.gpu_offload if runtime.pool is not None else False,
            "cache": runtime.models.cache_usage(),
            "disk_free_bytes": shutil.disk_usage(runtime.settings.data_dir).free,
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
