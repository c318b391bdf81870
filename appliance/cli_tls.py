"""``appliance tls``: a self-signed CA and server certificate for serving beyond loopback.

Attached to the ``appliance`` group by ``appliance/cli.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from appliance.errors import NotFound

if TYPE_CHECKING:
    from appliance.settings import Settings

__all__ = ["tls"]


@click.group()
def tls() -> None:
    """Make and show the certificate `appliance serve` answers HTTPS with."""


@tls.command("init")
@click.option("--names", default="", help="More names or addresses the certificate covers, comma-separated.")
@click.option("--force", is_flag=True, help="Replace the CA and certificate made before.")
@click.pass_context
def init(ctx: click.Context, names: str, force: bool) -> None:
    """Make a CA and a server certificate (for localhost, the loopback addresses, this host's name,
    server.public_names and --names) in DATA_DIR/tls, and print the CA's fingerprint.

    `appliance serve` then answers HTTPS with it. Clients trust DATA_DIR/tls/ca.crt, or pin the
    fingerprint.

    Example: appliance tls init --names box.lan,192.168.1.20
    """
    from appliance.tls import ca_fingerprint, init_tls

    settings: Settings = ctx.obj["settings"]()
    extra = [name.strip() for name in names.split(",") if name.strip()]
    files = init_tls(settings, extra, force=force)
    click.echo(f"CA certificate: {files.ca_cert}")
    click.echo(f"server certificate: {files.server.cert} (key {files.server.key})")
    click.echo(f"CA fingerprint: {ca_fingerprint(files.ca_cert)}")


@tls.command("show")
@click.pass_context
def show(ctx: click.Context) -> None:
    """Print the CA's fingerprint (and where its files are) again.

    Example: appliance tls show
    """
    from appliance.tls import ca_fingerprint, tls_files

    files = tls_files(ctx.obj["settings"]())
    if not files.ca_cert.exists():
        raise NotFound(f"no CA in {files.directory}", hint="make one with `appliance tls init`")
    click.echo(f"CA certificate: {files.ca_cert}")
    click.echo(f"server certificate: {files.server.cert}")
    click.echo(f"CA fingerprint: {ca_fingerprint(files.ca_cert)}")
