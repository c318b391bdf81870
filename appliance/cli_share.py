"""``appliance models cp`` and ``appliance models push``: a second name for a model (its blobs
shared), and a model sent to an OCI registry in Ollama's layout, as ``/api/copy`` and ``/api/push`` do.

Attached to the ``models`` group by ``appliance/cli.py``; uses its consoles and helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from appliance.cli import _cli_context, _run, stderr

if TYPE_CHECKING:
    from appliance.provision.push import PushProgress

__all__ = ["copy_model", "push_model"]


@click.command("cp")
@click.argument("source")
@click.argument("destination")
@click.pass_context
def copy_model(ctx: click.Context, source: str, destination: str) -> None:
    """Give a model a second name; the two share their files (nothing is copied on disk).

    Example: appliance models cp tinyllama:1.1b registry.lan/team/tinyllama:1.1b
    """
    from appliance.models.create import ModelCreator

    model = _run(ctx, lambda runtime: ModelCreator(runtime.models).copy(source, destination, _cli_context()))
    click.echo(f"copied {source} to {model.name}")


@click.command("push")
@click.argument("name")
@click.option("--insecure", is_flag=True, help="Plain HTTP, to a registry on loopback only.")
@click.pass_context
def push_model(ctx: click.Context, name: str, insecure: bool) -> None:
    """Push a model to the registry its name starts with (else models.download.ollama_registry),
    in Ollama's manifest layout, so `appliance models pull NAME` or `ollama pull` takes it back.

    Example: appliance models push registry.lan:5000/team/tinyllama:1.1b
    """

    def report(progress: PushProgress) -> None:
        if progress.digest is None:
            stderr.print(progress.status)

    where = _run(
        ctx,
        lambda runtime: runtime.provisioner.pusher.push(
            name, _cli_context(), insecure=insecure, on_progress=report
        ),
    )
    click.echo(f"pushed {name} to {where}")
