"""``appliance mcp tools``: the catalogue with its schemas, no server needed."""

from __future__ import annotations

import json
from typing import Any

from appliance.mcp.catalog import CATALOG


def test_mcp_tools_lists_the_catalogue_with_schemas(cli: Any) -> None:
    listed = cli("mcp", "tools", "--json")
    assert listed.returncode == 0, listed.stderr
    tools = json.loads(listed.stdout)
    assert [tool["name"] for tool in tools] == list(CATALOG)
    pull = next(tool for tool in tools if tool["name"] == "models.pull")
    assert pull["action"] == "models.pull"
    assert pull["task_only"] is False
    assert "ref" in pull["input_schema"]["required"]
    assert "download_id" in pull["output_schema"]["properties"]
    text = cli("mcp", "tools")
    assert text.returncode == 0
    assert "preference.get" in text.stdout
    assert "preferences.read" in text.stdout
