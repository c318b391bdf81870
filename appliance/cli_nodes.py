"""``appliance nodes``: join tokens and the workers that joined, on the data dir like every local
command (whoever runs them owns it, so they act as admin). A running server sees each change at
its next sweep (within a second): a removed node's work fails, a node told to load a model is
woken to fetch its new config.

Attached to the ``appliance`` group by ``appliance/cli.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from appliance.cli import _cli_context, _emit_json, _runtime, _table, _visible, stderr, stdout

if TYPE_CHECKING:
    from appliance.cluster.service import NodeOut
    from appliance.settings import Settings

__all__ = ["nodes"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
def nodes() -> None:
    """Workers: join tokens, the nodes that joined, and the models each keeps loaded."""


@nodes.group("token")
def token() -> None:
    """Join tokens: what `appliance worker join` trades for a node's own credential."""


@token.command("create")
@click.option("--expires", help="Lifetime, like 1h, 24h or 7d, or never (default: cluster.token_expiry).")
@click.option(
    "--url",
    help="The address workers reach this server at, like https://box.lan:8443, for the join line "
    "(default: https://FIRST-PUBLIC-NAME:PORT with TLS, else this machine's local address).",
)
@json_option
@click.pass_context
def token_create(ctx: click.Context, expires: str | None, url: str | None, as_json: bool) -> None:
    """Make a join token and print it: this is the only time it is shown. It carries this server's
    certificate fingerprint (from `appliance tls init`), so a worker pins it before it sends
    anything; many workers may join with it until it expires or is revoked.

    Example: appliance nodes token create --expires 1h --url https://box.lan:8443
    """
    from appliance.client import server_address

    given = server_address(url).url if url is not None else None  # checked before a token is made
    with _runtime(ctx) as runtime:
        made = runtime.cluster.create_token(_cli_context(), expires=expires)
        tls = runtime.cluster.fingerprint() is not None
        public = bool(runtime.settings.server.public_names) and tls
        join_url = given or _server_url(runtime.settings, tls=tls)
    if as_json:
        _emit_json(made.model_dump())
        return
    click.echo(made.token)  # alone on stdout, so `$(appliance nodes token create)` captures it
    lasts = "never expiring" if made.expires_at is None else f"until {made.expires_at}"
    stderr.print(f"join token {made.id} made, {lasts}.")
    stderr.print("On each worker, run:")
    stderr.print(f"  appliance worker join {join_url} --token {made.token}", soft_wrap=True)
    if given is None and not public:
        # The settings' host and port: a `serve --port` or a name on the LAN is unknown here.
        stderr.print(
            f"{join_url} is this machine's local address from its settings (host, port); if workers"
            " reach the server at another one (serve --port, a name on the LAN), use that, or make"
            " the token with --url URL."
        )
    stderr.print(f"It is shown only this once. Revoke it with: appliance nodes token rm {made.id}")


def _server_url(settings: Settings, *, tls: bool) -> str:
    """Where workers reach this server: where other servers would (``default_advertise_url``)."""
    from appliance.settings import default_advertise_url

    return default_advertise_url(settings, tls=tls)


@token.command("ls")
@json_option
@click.pass_context
def token_ls(ctx: click.Context, as_json: bool) -> None:
    """List join tokens (never their secrets): state, expiry and how many nodes joined with each.

    Example: appliance nodes token ls
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.list_tokens()
    if as_json:
        _emit_json([item.model_dump() for item in found])
        return
    table = _table("ID", "STATE", "CREATED", "BY", "EXPIRES", "USES")
    for item in found:
        table.add_row(
            item.id, item.state, item.created_at, item.created_by, item.expires_at or "never", str(item.uses)
        )
    stdout.print(table)


@token.command("rm")
@click.argument("token_id")
@click.pass_context
def token_rm(ctx: click.Context, token_id: str) -> None:
    """Revoke a join token at once; the nodes that joined with it stay.

    Example: appliance nodes token rm 3f9a1c2b7d4e5f60
    """
    with _runtime(ctx) as runtime:
        runtime.cluster.revoke_token(token_id, _cli_context())
    stdout.print(f"revoked join token {token_id}")


@nodes.command("ls")
@json_option
@click.pass_context
def nodes_ls(ctx: click.Context, as_json: bool) -> None:
    """List the nodes: state (ready, draining, unavailable), last heartbeat, load and models.

    Example: appliance nodes ls
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.list_nodes()
    if as_json:
        _emit_json([node.model_dump() for node in found])
        return
    table = _table("ID", "NAME", "STATE", "LAST HEARTBEAT", "ACTIVE", "MODELS")
    for node in found:
        table.add_row(
            node.id,
            _visible(node.name),
            node.state,
            _since(node),
            str(node.load.get("active", 0)),
            ", ".join(f"{_visible(m.model)} ({m.state})" for m in node.models) or "-",
        )
    stdout.print(table)


def _since(node: NodeOut) -> str:
    if node.seconds_since_heartbeat is None:
        return "never"
    return f"{node.seconds_since_heartbeat:.0f} s ago"


@nodes.command("show")
@click.argument("node")
@json_option
@click.pass_context
def nodes_show(ctx: click.Context, node: str, as_json: bool) -> None:
    """One node by id or name: capabilities, load, config and every model it holds.

    Example: appliance nodes show w1
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.get_node(node)
    if as_json:
        _emit_json(found.model_dump())
        return
    caps = found.capabilities
    lines = [
        f"node {found.name} ({found.id}): {found.state}",
        f"joined: {found.joined_at}",
        f"last heartbeat: {found.last_heartbeat_at or 'never'} ({_since(found)})",
        f"version: {caps.get('version', '-')}, memory budget: {caps.get('memory_budget', '-')}",
        f"gpus: {len(caps.get('gpus') or [])}, disk free: {caps.get('disk_free_bytes', '-')}",
        f"load: {found.load.get('active', 0)} active, {found.load.get('queued', 0)} queued",
        f"config: {found.config_version} (applied: {found.config_applied or 'not yet'})",
    ]
    for entry in found.config.get("models", []):
        lines.append(f"  told to load {entry.get('model')} ({entry.get('digest')})")
    for held in found.models:
        reason = f": {held.reason}" if held.reason else ""
        lines.append(f"  holds {held.model} {held.digest} {held.state}{reason}")
    for line in lines:
        stdout.print(_visible(line))


@nodes.command("drain")
@click.argument("node")
@click.pass_context
def nodes_drain(ctx: click.Context, node: str) -> None:
    """Send a node no new work; what runs there finishes.

    Example: appliance nodes drain w1
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.drain(node, _cli_context())
    stdout.print(f"node {_visible(found.name)} is draining")


@nodes.command("undrain")
@click.argument("node")
@click.pass_context
def nodes_undrain(ctx: click.Context, node: str) -> None:
    """Send a drained node work again.

    Example: appliance nodes undrain w1
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.undrain(node, _cli_context())
    stdout.print(f"node {_visible(found.name)} takes work again ({found.state})")


@nodes.command("rm")
@click.argument("node")
@click.pass_context
def nodes_rm(ctx: click.Context, node: str) -> None:
    """Forget a node: its credential stops working at once and its work in flight fails. To come
    back it joins again with a join token.

    Example: appliance nodes rm w1
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.remove(node, _cli_context())
    stdout.print(f"removed node {_visible(found.name)} ({found.id})")


@nodes.command("load")
@click.argument("node")
@click.argument("model")
@click.pass_context
def nodes_load(ctx: click.Context, node: str, model: str) -> None:
    """Tell a node to keep a model loaded: it fetches the file from this server's cache (never
    from anywhere else), verifies it, loads it and reports `available` (or `failed`, why).

    Example: appliance nodes load w1 tiny
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.assign_model(node, model, _cli_context())
    stdout.print(
        f"node {_visible(found.name)} is told to load {_visible(model)} (config {found.config_version})"
    )
    stderr.print(f"follow it with: appliance nodes show {_visible(found.name)}")


@nodes.command("unload")
@click.argument("node")
@click.argument("model")
@click.pass_context
def nodes_unload(ctx: click.Context, node: str, model: str) -> None:
    """Tell a node to unload a model (its file stays in the node's cache).

    Example: appliance nodes unload w1 tiny
    """
    with _runtime(ctx) as runtime:
        found = runtime.cluster.unassign_model(node, model, _cli_context())
    stdout.print(
        f"node {_visible(found.name)} is told to unload {_visible(model)} (config {found.config_version})"
    )
