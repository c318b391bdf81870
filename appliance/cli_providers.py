"""``appliance providers``: the external OpenAI-compatible or Anthropic APIs the appliance may route
a model call to, on the data dir like every local command (whoever runs them owns it, so they act
as admin). A key is read from stdin (``--key-stdin``), never from the command line, where shell
history and ``ps`` would keep it; it is stored encrypted and never printed again.

Attached to the ``appliance`` group by ``appliance/cli.py``.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from appliance.cli import _cli_context, _emit_json, _runtime, _table, _visible, stderr, stdout

if TYPE_CHECKING:
    from appliance.egress.types import Provider

__all__ = ["providers"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
key_stdin_option = click.option(
    "--key-stdin", is_flag=True, help="Read the provider's API key from the first line of stdin."
)


def _list(text: str | None) -> list[str] | None:
    from appliance.egress.providers import parse_list

    return None if text is None else parse_list(text)


def _read_key() -> str:
    if sys.stdin.isatty():
        key: str = click.prompt("Provider key", hide_input=True, default="", show_default=False)
        return key
    return sys.stdin.readline().rstrip("\r\n")


def _describe(provider: Provider) -> str:
    key = "key set" if provider.key_set else "no key"
    return f"{provider.name} ({provider.kind}, {_visible(provider.base_url)}, {key})"


@click.group()
def providers() -> None:
    """External providers: OpenAI-compatible or Anthropic APIs that model calls may be routed to
    when policy allows (model_routing.*)."""


@providers.command("add")
@click.argument("name")
@click.option(
    "--base-url", required=True, help="Like https://api.openai.com/v1 or https://api.anthropic.com."
)
@click.option(
    "--kind",
    type=click.Choice(["openai", "anthropic"]),
    default="openai",
    show_default=True,
    help="Its wire format.",
)
@click.option("--models", help="The models it serves, comma-separated (default: any name asked for).")
@click.option("--operations", help="What it may be called for: chat,complete,embed,models (default: all).")
@click.option(
    "--subjects",
    help="Whom calls may be made for, comma-separated: *, role:admin, role:user, user:NAME, key:NAME, "
    "task (default: *).",
)
@key_stdin_option
@click.pass_context
def providers_add(
    ctx: click.Context,
    name: str,
    base_url: str,
    kind: str,
    models: str | None,
    operations: str | None,
    subjects: str | None,
    key_stdin: bool,
) -> None:
    """Add a provider. Without --key-stdin it is called without a key (a server on the LAN).

    Example: appliance providers add openai --base-url https://api.openai.com/v1 --key-stdin < key.txt
    """
    from appliance.egress.providers import parse_list
    from appliance.egress.types import OPERATIONS

    key = _read_key() if key_stdin else None
    with _runtime(ctx) as runtime:
        added = runtime.providers.add(
            name,
            kind=kind,
            base_url=base_url,
            models=parse_list(models or ""),
            operations=parse_list(operations) if operations is not None else OPERATIONS,
            subjects=parse_list(subjects) if subjects is not None else ("*",),
            key=key,
            context=_cli_context(),
        )
        allowed = runtime.settings.model_routing.allowed_external_providers
    stdout.print(f"added provider {_describe(added)}")
    stderr.print(f"check it: appliance providers test {added.name}")
    if "*" not in allowed and added.name not in allowed:
        listed = json.dumps([*allowed, added.name])
        stderr.print(
            f"route to it: appliance prefs set model_routing.allowed_external_providers '{listed}'",
            soft_wrap=True,
        )


@providers.command("ls")
@json_option
@click.pass_context
def providers_ls(ctx: click.Context, as_json: bool) -> None:
    """List the providers; KEY says whether one is set (a key is never shown).

    Example: appliance providers ls
    """
    from appliance.egress.providers import ProviderOut

    with _runtime(ctx) as runtime:
        found = runtime.providers.list()
    if as_json:
        _emit_json([ProviderOut.of(provider).model_dump() for provider in found])
        return
    table = _table("NAME", "KIND", "BASE URL", "MODELS", "KEY", "OPERATIONS", "SUBJECTS")
    for provider in found:
        table.add_row(
            provider.name,
            provider.kind,
            _visible(provider.base_url),
            _visible(",".join(provider.models)) or "any",
            "set" if provider.key_set else "unset",
            ",".join(provider.operations),
            _visible(",".join(provider.subjects)),
        )
    stdout.print(table)


@providers.command("show")
@click.argument("name")
@json_option
@click.pass_context
def providers_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one provider (its key only as set or unset).

    Example: appliance providers show openai --json
    """
    from appliance.egress.providers import ProviderOut

    with _runtime(ctx) as runtime:
        shown = ProviderOut.of(runtime.providers.get(name))
    if as_json:
        _emit_json(shown.model_dump())
        return
    for field, value in shown.model_dump().items():
        if field == "key_set":
            field, value = "key", "set" if value else "unset"
        elif isinstance(value, list):
            value = ",".join(value) or ("any" if field == "models" else "none")
        stdout.print(f"{field}: {_visible(str(value))}")


@providers.command("set")
@click.argument("name")
@click.option("--base-url", help="A new base URL.")
@click.option("--models", help="The models it serves, comma-separated; '' for any name asked for.")
@click.option("--operations", help="What it may be called for: chat,complete,embed,models.")
@click.option(
    "--subjects", help="Whom calls may be made for: *, role:admin, role:user, user:NAME, key:NAME, task."
)
@key_stdin_option
@click.option("--clear-key", is_flag=True, help="Remove its key: calls are made without one.")
@click.pass_context
def providers_set(
    ctx: click.Context,
    name: str,
    base_url: str | None,
    models: str | None,
    operations: str | None,
    subjects: str | None,
    key_stdin: bool,
    clear_key: bool,
) -> None:
    """Change a provider: the fields given, and its key (--key-stdin or --clear-key).

    Example: appliance providers set openai --models gpt-4o,gpt-4o-mini
    """
    from appliance.errors import InvalidInput

    if key_stdin and clear_key:
        raise InvalidInput("--key-stdin and --clear-key contradict each other", hint="give one of them")
    with _runtime(ctx) as runtime:
        changed = runtime.providers.change(
            name,
            base_url=base_url,
            models=_list(models),
            operations=_list(operations),
            subjects=_list(subjects),
            key=_read_key() if key_stdin else None,
            key_given=key_stdin or clear_key,
            context=_cli_context(),
        )
    stdout.print(f"changed provider {_describe(changed)}")


@providers.command("rm")
@click.argument("name")
@click.pass_context
def providers_rm(ctx: click.Context, name: str) -> None:
    """Remove a provider and its key.

    Example: appliance providers rm openai
    """
    with _runtime(ctx) as runtime:
        runtime.providers.remove(name, _cli_context())
    stdout.print(f"removed provider {name} and its key")


@providers.command("keygen")
def providers_keygen() -> None:
    """Print a new value for egress.encryption_key (the config file's [egress] encryption_key, or
    APPLIANCE_EGRESS__ENCRYPTION_KEY): set the same one on every server sharing a database.
    Provider keys sealed with another key must then be set again.

    Example: appliance providers keygen
    """
    from appliance.egress.secrets import KeyBox

    click.echo(KeyBox.generate())


@providers.command("test")
@click.argument("name")
@json_option
@click.pass_context
def providers_test(ctx: click.Context, name: str, as_json: bool) -> None:
    """Fetch a provider's model list with its key and say whether it answered; exits 1 when not.

    Example: appliance providers test openai
    """
    import asyncio
    from dataclasses import asdict

    with _runtime(ctx) as runtime:
        provider = runtime.providers.get(name)
        probe = asyncio.run(runtime.egress.probe(provider, context=_cli_context()))
    if as_json:
        _emit_json(asdict(probe))
    elif probe.ok:
        listed = f"; it lists {len(probe.models)} models: {', '.join(probe.models)}" if probe.models else ""
        stdout.print(_visible(f"{name} answered (HTTP {probe.status}, {probe.seconds:.2f} s){listed}"))
    else:
        status = f" (HTTP {probe.status})" if probe.status is not None else ""
        stderr.print(_visible(f"{name} did not answer{status}: {probe.error or 'no answer'}"))
        if probe.status in (401, 403):
            stderr.print(f"hint: set its key again: appliance providers set {name} --key-stdin")
    if not probe.ok:
        ctx.exit(1)
