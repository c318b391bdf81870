"""``appliance servers``: the servers sharing this data dir's database (several on PostgreSQL),
alive or not. Attached to the ``appliance`` group by ``appliance/cli.py``.
"""

from __future__ import annotations

import click

from appliance.cli import _emit_json, _runtime, _table, _visible, stdout

__all__ = ["servers"]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def servers(ctx: click.Context, as_json: bool) -> None:
    """List the servers sharing the database: the URL each fetches blobs from the others at, its
    version, when it started and was last heard from, and whether it is alive (within 45 s).

    Example: appliance --config shared.toml servers
    """
    with _runtime(ctx) as runtime:
        found = runtime.peers.list_servers()
    if as_json:
        _emit_json([server.model_dump() for server in found])
        return
    table = _table("ID", "URL", "STATE", "VERSION", "STARTED", "LAST SEEN")
    for server in found:
        state = "alive" if server.alive else "gone"
        table.add_row(
            server.id + (" (this data dir)" if server.this else ""),
            _visible(server.url),
            state,
            server.version,
            server.started_at,
            server.last_seen_at,
        )
    stdout.print(table)
