"""``appliance mcp``: the MCP gateway's tool catalogue, and a stdio bridge to a server's ``/mcp``
for MCP clients that only launch commands. Attached to the ``appliance`` group by ``appliance/cli.py``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from appliance.cli import _emit_json, _table, stdout

__all__ = ["mcp_group"]


@click.group(name="mcp")
def mcp_group() -> None:
    """The MCP gateway at /mcp: its tools, and a bridge for clients that launch a command."""


@mcp_group.command("tools")
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (with each tool's schemas) instead of text."
)
def tools(as_json: bool) -> None:
    """List the tools the gateway serves: name, the action a caller's role needs, whether only a
    task's job may call it, and what it does. No server needed.

    Example: appliance mcp tools --json
    """
    from appliance.mcp.catalog import CATALOG
    from appliance.mcp.types import TASK_ONLY_TOOLS

    if as_json:
        described: list[dict[str, Any]] = []
        for tool in CATALOG.values():
            input_schema, output_schema = tool.schemas()
            described.append(
                {
                    "name": tool.name,
                    "title": tool.title,
                    "description": tool.description,
                    "action": tool.action,
                    "task_only": tool.name in TASK_ONLY_TOOLS,
                    "input_schema": input_schema,
                    "output_schema": output_schema,
                }
            )
        _emit_json(described)
        return
    table = _table("TOOL", "ACTION", "WHO", "DESCRIPTION")
    for tool in CATALOG.values():
        who = "a job only" if tool.name in TASK_ONLY_TOOLS else "the role, or a job's grant"
        table.add_row(tool.name, tool.action, who, tool.description)
    stdout.print(table)


@mcp_group.command("stdio")
@click.option(
    "--url",
    help="The gateway's URL (default: the server `appliance login` saved, else HOST:PORT from the "
    "settings, each with /mcp).",
)
@click.pass_context
def stdio(ctx: click.Context, url: str | None) -> None:
    """Bridge MCP over stdin/stdout to a server's /mcp, for a desktop client that launches a
    command instead of calling a URL. It talks to the server as the other commands do: the key is
    APPLIANCE_API_KEY (the api_key setting), else the login's, sent as a Bearer token; the
    login's pinned CA (or this data dir's) trusts the server's certificate.

    Example: appliance mcp stdio --url https://box.lan:8443/mcp  (with APPLIANCE_API_KEY set)
    """
    import anyio

    from appliance.client import connection
    from appliance.mcp.bridge import bridge

    found = connection(ctx.obj["settings"]())
    if url is None or url.startswith(f"{found.url}/"):
        anyio.run(bridge, url or f"{found.url}/mcp", found.key, found.verify)
    else:  # another server: neither the login's key nor its pinned CA is for it
        anyio.run(bridge, url, None if found.key_from_login else found.key)
    sys.stdout.flush()
