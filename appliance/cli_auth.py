"""``appliance users`` and ``appliance keys``: accounts and API keys, on the data dir like every
local command (whoever runs them owns it, so they act as admin)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from appliance.cli import _cli_context, _emit_json, _runtime, _table, stderr, stdout
from appliance.identity import ROLES

if TYPE_CHECKING:
    from appliance.auth.service import KeyOut

__all__ = ["keys", "users"]


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password: str = click.prompt(
        "Password", hide_input=True, confirmation_prompt=True, default="", show_default=False
    )
    return password


@click.group()
def users() -> None:
    """Manage accounts: admins, users and nodes."""


@users.command("add")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(ROLES), default="user", show_default=True, help="What the user may do."
)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--no-password", is_flag=True, help="An account only its API keys act for (a node's).")
@click.pass_context
def users_add(ctx: click.Context, name: str, role: str, password_stdin: bool, no_password: bool) -> None:
    """Add a user; asks for a password (at least 10 characters) unless --password-stdin or --no-password.

    Example: appliance users add alice --role admin
    """
    password = None if no_password else _read_password(password_stdin)
    with _runtime(ctx) as runtime:
        user = runtime.auth.add_user(name, role, password, _cli_context())
    stdout.print(f"added {user.role} {user.name}")
    stderr.print(f"make them an API key: appliance keys create --user {user.name}")


@users.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def users_ls(ctx: click.Context, as_json: bool) -> None:
    """List the users and their roles.

    Example: appliance users ls
    """
    with _runtime(ctx) as runtime:
        found = runtime.auth.list_users()
    if as_json:
        _emit_json([user.model_dump() for user in found])
        return
    table = _table("NAME", "ROLE", "PASSWORD", "CREATED")
    for user in found:
        table.add_row(user.name, user.role, "set" if user.has_password else "none", user.created_at)
    stdout.print(table)


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.pass_context
def users_passwd(ctx: click.Context, name: str, password_stdin: bool) -> None:
    """Set a user's password.

    Example: appliance users passwd alice
    """
    password = _read_password(password_stdin)
    with _runtime(ctx) as runtime:
        runtime.auth.set_password(name, password, _cli_context())
    stdout.print(f"password of {name} changed")


@users.command("role")
@click.argument("name")
@click.argument("role", type=click.Choice(ROLES))
@click.pass_context
def users_role(ctx: click.Context, name: str, role: str) -> None:
    """Change a user's role; their API keys follow at once.

    Example: appliance users role alice admin
    """
    with _runtime(ctx) as runtime:
        runtime.auth.set_role(name, role, _cli_context())
    stdout.print(f"{name} is now {role}")


@users.command("rm")
@click.argument("name")
@click.pass_context
def users_rm(ctx: click.Context, name: str) -> None:
    """Remove a user and their API keys.

    Example: appliance users rm alice
    """
    with _runtime(ctx) as runtime:
        runtime.auth.remove_user(name, _cli_context())
    stdout.print(f"removed {name} and their API keys")


@click.group()
def keys() -> None:
    """Manage API keys (sent as `Authorization: Bearer KEY` or `x-api-key: KEY`)."""


@keys.command("create")
@click.option("--name", default="", help="What the key is for, to recognise it in lists.")
@click.option(
    "--role", type=click.Choice(ROLES), help="Its role (default: the user's; 'user' with no --user)."
)
@click.option("--expires", help="Lifetime, like 12h, 30d or 8w (default: never).")
@click.option("--user", help="The user it acts for (default: none, a key of its own).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def keys_create(
    ctx: click.Context, name: str, role: str | None, expires: str | None, user: str | None, as_json: bool
) -> None:
    """Make an API key and print it: this is the only time it is shown.

    Example: appliance keys create --user alice --expires 30d
    """
    with _runtime(ctx) as runtime:
        key = runtime.auth.create_key(_cli_context(), name=name, role=role, expires=expires, user=user)
    if as_json:
        _emit_json(key.model_dump())
        return
    click.echo(key.key)  # alone on stdout, so `$(appliance keys create ...)` captures it
    stderr.print(f"key {key.id} ({key.role}{', for ' + key.user if key.user else ''}) made.")
    stderr.print("Store it now: it is shown only this once. Revoke it with: appliance keys revoke " + key.id)


@keys.command("ls")
@click.option("--user", help="Only this user's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def keys_ls(ctx: click.Context, user: str | None, as_json: bool) -> None:
    """List API keys (never their secrets: only their first characters).

    Example: appliance keys ls --user alice
    """
    with _runtime(ctx) as runtime:
        found = runtime.auth.list_keys(user=user)
    if as_json:
        _emit_json([key.model_dump() for key in found])
        return
    _print_keys(found)


def _print_keys(found: list[KeyOut]) -> None:
    table = _table("ID", "NAME", "PREFIX", "ROLE", "USER", "STATE", "CREATED", "EXPIRES", "LAST USED")
    for key in found:
        table.add_row(
            key.id,
            key.name,
            key.prefix + "…",
            key.role,
            key.user or "-",
            key.state,
            key.created_at,
            key.expires_at or "never",
            key.last_used_at or "never",
        )
    stdout.print(table)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke an API key at once (it stays listed, as revoked).

    Example: appliance keys revoke 3f9a1c2b7d4e
    """
    with _runtime(ctx) as runtime:
        runtime.auth.revoke_key(key_id, _cli_context())
    stdout.print(f"revoked {key_id}")
