"""``appliance worker``: this machine becomes a worker of a server, with a data dir of its own.

``join`` trades a join token for a node credential (kept in DATA_DIR/worker.json), then runs;
``run`` runs again from that file (a restart: no new join). Both run until SIGINT or SIGTERM,
printing one line per change of state. The worker opens every connection and listens on no port.
Attached to the CLI by ``appliance/cli.py``. Imports only click at load.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.errors import NotFound

if TYPE_CHECKING:
    from appliance.cluster.agent import WorkerConfig
    from appliance.engine.pool import EnginePool
    from appliance.settings import Settings

__all__ = ["worker"]

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="The worker's own data dir: its cache and worker.json (default: the data dir setting).",
)


def _settings(ctx: click.Context, data_dir: Path | None) -> Settings:
    settings: Settings = ctx.obj["settings"]()
    return settings if data_dir is None else settings.model_copy(update={"data_dir": data_dir})


def _log(line: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {line}", err=True)


def _run(config: WorkerConfig, settings: Settings, pool: EnginePool) -> None:
    """Run the agent until SIGINT or SIGTERM (or until the server revokes the credential)."""
    import asyncio
    import signal

    from appliance.cluster.agent import Agent

    agent = Agent(config, settings, log=_log, pool=pool)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, agent.stop)
        await agent.run()

    try:
        asyncio.run(main())
    finally:
        pool.close()
    _log("stopped")


@click.group()
def worker() -> None:
    """Make this machine a worker of an appliance server (it needs no open port)."""


@worker.command("join")
@click.argument("url")
@click.option("--token", required=True, help="The join token `appliance nodes token create` printed.")
@click.option("--name", help="The node's name on the server (default: this host's name).")
@data_dir_option
@click.option("--insecure-http", is_flag=True, help="Join a plain-HTTP server beyond loopback (unsafe).")
@click.pass_context
def join(
    ctx: click.Context, url: str, token: str, name: str | None, data_dir: Path | None, insecure_http: bool
) -> None:
    """Join the server at URL with a join token, then run as its worker until interrupted.

    Over https the server's CA is pinned from the fingerprint the token carries; plain http is
    for a server on this machine's loopback only, unless --insecure-http.

    Example: appliance worker join https://box.lan:8080 --token apjoin1.… --data-dir ~/worker
    """
    import socket

    from appliance.cluster.agent import capabilities
    from appliance.cluster.join import join as join_server
    from appliance.engine.pool import EnginePool

    settings = _settings(ctx, data_dir)
    pool = EnginePool(settings.engine)
    try:
        config = join_server(
            url,
            token,
            name=name or socket.gethostname()[:64],  # as long as a node's name may be
            data_dir=settings.data_dir,
            capabilities=lambda: capabilities(settings.data_dir, pool.memory_budget),
            insecure_http=insecure_http,
        )
    except BaseException:
        pool.close()
        raise
    _log(f"joined {config.server} as {config.name} (node {config.node_id})")
    _run(config, settings, pool)


@worker.command("run")
@data_dir_option
@click.pass_context
def run(ctx: click.Context, data_dir: Path | None) -> None:
    """Run as the worker this data dir joined (after a restart: no new join), until interrupted.

    Example: appliance worker run --data-dir ~/worker
    """
    from appliance.cluster.agent import WorkerConfig
    from appliance.engine.pool import EnginePool

    settings = _settings(ctx, data_dir)
    config = WorkerConfig.read(settings.data_dir)
    if config is None:
        raise NotFound(
            f"{settings.data_dir} has not joined a server (no {WorkerConfig.path(settings.data_dir).name})",
            hint="join first: appliance worker join URL --token T --data-dir DIR",
        )
    _log(f"starting as {config.name} (node {config.node_id}) of {config.server}")
    _run(config, settings, EnginePool(settings.engine))
