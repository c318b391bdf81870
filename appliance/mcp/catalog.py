"""Every tool the gateway serves, by name, in the order ``TOOL_NAMES`` gives."""

from __future__ import annotations

from typing import Any

from appliance.mcp.tools import artifacts, inference, models, preferences, tasks
from appliance.mcp.types import TOOL_NAMES, Tool

__all__ = ["CATALOG"]

_MODULES = (preferences, models, inference, tasks, artifacts)
_BY_NAME = {tool.name: tool for module in _MODULES for tool in module.TOOLS}
CATALOG: dict[str, Tool[Any, Any]] = {name: _BY_NAME[name] for name in TOOL_NAMES if name in _BY_NAME}
