"""MCP tools: models."""

from __future__ import annotations

from typing import Any

from appliance.mcp.types import Tool

TOOLS: list[Tool[Any, Any]] = []
