"""Every tool the gateway serves, by name, in the order ``TOOL_NAMES`` gives: each name there has
its tool, and each tool a name there (its action comes from it), or the import fails."""

from __future__ import annotations

from typing import Any

from appliance.mcp.tools import artifacts, inference, models, preferences, tasks
from appliance.mcp.types import TOOL_NAMES, Tool

__all__ = ["CATALOG"]

_MODULES = (preferences, models, inference, tasks, artifacts)
_BY_NAME = {tool.name: tool for module in _MODULES for tool in module.TOOLS}
if set(_BY_NAME) != set(TOOL_NAMES):  # a programming error: fail at import, not at a caller's call
    raise RuntimeError(f"the MCP tools and TOOL_NAMES differ: {sorted(set(_BY_NAME) ^ set(TOOL_NAMES))}")
CATALOG: dict[str, Tool[Any, Any]] = {name: _BY_NAME[name] for name in TOOL_NAMES}
