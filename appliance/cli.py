"""The ``appliance`` command. Each command calls the same services the API uses.

Errors print one line saying what went wrong and one saying what to do, and exit 1.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from appliance import __version__
from appliance.errors import ApplianceError, InvalidSetting
from appliance.queries import DOWNLOAD_STATES

# Everything else is imported where a command uses it: every call of the command, `--help`
# included, pays for what this module imports (Rich, pydantic, the store: about 1 s before).
if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from appliance.audit import Context
    from appliance.client import ServerClient
    from appliance.provision.service import PullProgress
    from appliance.runtime import Runtime
    from appliance.settings import Settings

__all__ = ["main"]

T = TypeVar("T")


class _LazyConsole:
    """A Rich console made on its first use."""

    def __init__(self, *, to_stderr: bool) -> None:
        self._to_stderr = to_stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from appliance.cli_rich import make_console

            self._console = make_console(to_stderr=self._to_stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


stdout = cast("Console", _LazyConsole(to_stderr=False))
stderr = cast("Console", _LazyConsole(to_stderr=True))


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _visible(text: str) -> str:
    from appliance.cli_rich import visible

    return visible(text)


def _print_error(message: str, hint: str | None) -> None:
    from rich.text import Text

    stderr.print(Text.assemble(("error:", "bold red"), " ", _visible(message)))
    if hint:
        stderr.print(Text.assemble(("hint:", "bold"), " ", _visible(hint)))


def _table(*headers: str, pad_edge: bool = True) -> Table:
    from appliance.cli_rich import make_table

    return make_table(*headers, pad_edge=pad_edge)


def _progress(*, eta: bool) -> Progress:
    from appliance.cli_rich import make_progress

    # Rich itself gets the console, not the stand-in: it enters it as a context manager.
    return make_progress(cast(_LazyConsole, stderr).console, eta=eta)


def _cli_context() -> Context:
    """Who acts, for the audit log: the user running the command."""
    from appliance.audit import Context

    return Context.cli()


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@contextmanager
def _runtime(ctx: click.Context) -> Iterator[Runtime]:
    from appliance.runtime import Runtime

    runtime = Runtime.open(ctx.obj["settings"]())
    try:
        yield runtime
    finally:
        runtime.close()


def _run(ctx: click.Context, action: Callable[[Runtime], T]) -> T:
    with _runtime(ctx) as runtime:
        return action(runtime)


class ApplianceGroup(click.Group):
    """Turns ApplianceError into a message and a hint instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApplianceError as exc:
            _print_error(exc.message, exc.hint)
            ctx.exit(1)


@click.group(cls=ApplianceGroup)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Data dir (default ~/.local/share/appliance)."
)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="Config file (TOML).")
@click.option("--offline", is_flag=True, default=None, help="Make no outbound network call at all.")
@click.version_option(__version__, prog_name="appliance")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, config_file: Path | None, offline: bool | None) -> None:
    """Appliance: keep models, serve them, run jobs, on your own hardware.

    Example: appliance models import ./tiny.gguf --name tiny
    """
    flags: dict[str, Any] = {"data_dir": data_dir, "offline": offline}

    def settings(**more: Any) -> Settings:
        from appliance.settings import load_settings

        return load_settings(config_file=config_file, **flags, **more)

    ctx.obj = {"settings": settings}


# -- serve ------------------------------------------------------------------------------------


@cli.command()
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 8080).")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="PEM certificate (chain) for HTTPS.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="Its PEM private key.")
@click.option("--insecure-http", is_flag=True, help="Serve plain HTTP beyond loopback (warns).")
@click.option(
    "--database",
    metavar="URL",
    help="The store (store.url): postgresql://USER@HOST/DB to share one with other servers.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    insecure_http: bool,
    database: str | None,
) -> None:
    """Serve the API (and docs at /schema) until interrupted.

    HTTPS with --tls-cert/--tls-key, else with the certificate of `appliance tls init` when it
    was run, else plain HTTP.

    Example: appliance serve --port 8080
    """
    import uvicorn

    from appliance.settings import default_advertise_url, url_host
    from appliance.store.factory import open_data_dir
    from appliance.tls import require_transport, serving_pair
    from appliance.web.staged import StagedApp

    store_flag = None if database is None else {"url": database}
    settings: Settings = ctx.obj["settings"](host=host, port=port, store=store_flag)
    pair = serving_pair(settings, cert=tls_cert, key=tls_key, insecure_http=insecure_http)
    warning = require_transport(settings, tls=pair is not None, insecure_http=insecure_http)
    # Plain lines (click, not Rich) until the app exists: every import here delays the first answer.
    if warning:
        click.echo(f"warning: {warning}", err=True)
    _, store = open_data_dir(settings)  # fail here, with a clear message, if the data dir is unusable
    store.close()
    listener = _listen(settings.host, settings.port)
    if settings.port == 0:  # the system chose one; the app checks Host headers against the real one
        settings = settings.model_copy(update={"port": listener.getsockname()[1]})
    address = f"{url_host(settings.host)}:{settings.port}"
    scheme = "https" if pair else "http"
    if settings.server.advertise_url is None:  # where servers sharing the store reach this one
        advertised = default_advertise_url(settings, tls=pair is not None)
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update={"advertise_url": advertised})}
        )
    click.echo(f"appliance {__version__} serving on {scheme}://{address} ({settings.data_dir})", err=True)
    serving = settings

    def build() -> Any:
        """The app, in a thread while /healthz already answers (web/staged.py says why)."""
        import secrets

        from appliance.runtime import Runtime
        from appliance.web.app import create_app

        runtime = Runtime.open(serving)
        try:
            setup_token = secrets.token_urlsafe(24) if runtime.auth.needs_admin() else None
        finally:
            runtime.close()
        if setup_token is not None:
            # The one time it is shown: whoever reads this console (or its log) makes the first admin.
            stderr.print(
                f"no admin yet: open {scheme}://{address}/ and create one with the one-time setup token "
                f"{setup_token}\n(or run: appliance users add NAME --role admin)"
            )
        return create_app(serving, setup_token=setup_token)

    def stop() -> None:
        server.should_exit = True

    staged = StagedApp(build, on_failure=stop)
    # uvicorn serves on the socket bound above, so a port taken meanwhile cannot reach it as a raw OSError.
    config = uvicorn.Config(
        staged,
        host=settings.host.strip("[]"),
        port=settings.port,
        log_level="info",
        ssl_certfile=pair.cert if pair else None,
        ssl_keyfile=pair.key if pair else None,
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            staged.stopping()  # workers' long-polls end now, not after their wait
            await super().shutdown(sockets)

    server = Server(config)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a foreground server stops
    finally:
        listener.close()
    if staged.error is not None:
        _print_error(
            f"the server could not start: {staged.error}", "the log above says where; fix it and serve again"
        )
        ctx.exit(1)
    if not server.started:  # uvicorn has logged why
        ctx.exit(1)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (as uvicorn binds it), or our error saying why not."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY on accepted connections only then, and
    # without it a streamed answer's small writes wait on delayed ACKs (40 ms each on Linux).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bare, port))
        listener.listen(2048)
    except OSError as exc:
        from appliance.settings import url_host

        listener.close()
        address = f"{url_host(host)}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise InvalidSetting(
                f"cannot listen on {address}: the port is in use",
                hint="stop what listens there (is an appliance already serving?), or pass another --port",
            ) from exc
        raise InvalidSetting(
            f"cannot listen on {address}: {exc.strerror or exc}",
            hint="pass a --host this machine has (127.0.0.1, ::1) and a --port from 1024 to 65535",
        ) from exc
    return listener


def _server(ctx: click.Context, host: str | None, port: int | None) -> ServerClient:
    from appliance.client import ServerClient

    return ServerClient(ctx.obj["settings"](host=host, port=port))


# -- models -----------------------------------------------------------------------------------


@cli.group()
def models() -> None:
    """Manage the model cache and registry."""


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
# For commands that talk to the running server: the address it was started with.
host_option = click.option("--host", help="The server's address (default: the host setting, 127.0.0.1).")
port_option = click.option(
    "--port", type=click.IntRange(1, 65535), help="The server's port (default: the port setting, 8080)."
)


@models.command("import")
@click.argument("path", type=click.Path(path_type=Path, readable=False))
@click.option("--name", help="name[:tag] to register it under (default: from the filename).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "safetensors"]), help="Default: detected.")
@click.option("--copy", "force_copy", is_flag=True, help="Always copy, never reflink or hard-link.")
@click.option(
    "--link", "hard_link", is_flag=True, help="Hard-link when no reflink is possible (see the README)."
)
@click.option("--replace", is_flag=True, help="Put the file in place of the model's file (or GGUF).")
@json_option
@click.pass_context
def import_model(
    ctx: click.Context,
    path: Path,
    name: str | None,
    fmt: str | None,
    force_copy: bool,
    hard_link: bool,
    replace: bool,
    as_json: bool,
) -> None:
    """Import a local model file into the cache (hash, verify, register).

    The file is reflinked (copy-on-write) where the filesystem can, else copied while hashing.
    --link hard-links instead of copying: no second copy on disk, but the file becomes
    read-only and must belong to the appliance's user. --replace swaps the model's file.

    Example: appliance models import ./tinyllama.Q4_K_M.gguf --name tinyllama:1.1b
    """
    if force_copy and hard_link:
        raise click.UsageError("--copy and --link contradict each other; pass one")
    from appliance.models.schemas import ImportOut

    show_progress = stderr.is_terminal and not as_json
    progress = _progress(eta=False)
    with _runtime(ctx) as runtime, progress if show_progress else nullcontext():
        task = progress.add_task(f"importing {path.name}", total=_size_or_none(path))
        result = runtime.models.import_file(
            path,
            _cli_context(),
            name=name,
            fmt=fmt,
            allow_link=not force_copy,
            hard_link=hard_link,
            replace=replace,
            on_progress=(lambda done: progress.update(task, completed=done)) if show_progress else None,
        )
    if as_json:
        _emit_json(ImportOut.of(result).model_dump(mode="json"))
        return
    verb = "imported" if result.added else "already present:"
    click.echo(f"{verb} {result.model.name} {result.digest} ({_human(result.size_bytes)}, {result.method})")
    for evicted in result.evicted:
        click.echo(f"evicted {evicted} to stay within models.cache.max_bytes")


@models.command("pull")
@click.argument("ref")
@click.option("--name", help="name[:tag] to register it under (default: from the filename).")
@click.option("--digest", help="sha256:HEX the content must have; a mismatch keeps nothing.")
@click.option(
    "--strict", is_flag=True, help="Fail when no digest (given or from the source) covers the file."
)
@json_option
@click.pass_context
def pull_model(
    ctx: click.Context, ref: str, name: str | None, digest: str | None, strict: bool, as_json: bool
) -> None:
    """Make a model present by reference: download, verify and register it once.

    Already present means no network at all. An interrupted pull resumes where it stopped. An
    Ollama name (qwen3:4b, user/model:tag) comes from models.download.ollama_registry.

    Example: appliance models pull https://mirror.lan/models/tiny.gguf --digest sha256:0123…
    """
    from appliance.provision.schemas import PullOut

    show_progress = stderr.is_terminal and not as_json
    progress = _progress(eta=True)
    task = progress.add_task(f"pulling {ref}", total=None)
    announced: set[str] = set()

    def on_progress(update: PullProgress) -> None:
        if update.state == "pending" and "pending" not in announced:
            announced.add("pending")
            waiting = update.download_id
            stderr.print(f"download {waiting} waits for an admin: appliance downloads approve {waiting}")
        if update.note and update.note not in announced:  # e.g. why it starts over instead of resuming
            announced.add(update.note)
            stderr.print(f"note: {_visible(update.note)}")
        if show_progress:
            progress.update(task, completed=update.bytes_done, total=update.bytes_total)

    with _runtime(ctx) as runtime, progress if show_progress else nullcontext():
        resolved = runtime.provisioner.ensure_present(
            ref, _cli_context(), name=name, expected_digest=digest, strict=strict, on_progress=on_progress
        )
    if as_json:
        _emit_json(PullOut.of(resolved).model_dump(mode="json"))
        return
    if not resolved.downloaded:
        click.echo(f"already present: {resolved.id} {resolved.digest} ({_human(resolved.size)})")
        return
    click.echo(f"pulled {resolved.id} {resolved.digest} ({_human(resolved.size)}, {resolved.verification})")
    if resolved.verification == "unverified":
        stderr.print("warning: no digest covered this file; pass --digest to check it next time")


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


@models.command("ls")
@json_option
@click.option(
    "--limit", type=int, help="Show at most this many models (1 to 1000); a note says what follows."
)
@click.option("--cursor", help="Start after the models the page before showed (its note gives the cursor).")
@click.pass_context
def list_models(ctx: click.Context, as_json: bool, limit: int | None, cursor: str | None) -> None:
    """List models, by name.

    Example: appliance models ls --limit 50
    """
    from appliance.models.schemas import ModelOut

    if as_json:
        page = _run(ctx, lambda runtime: runtime.models.page(limit=limit, cursor=cursor))
        _emit_json([ModelOut.of(model).model_dump(mode="json") for model in page.models])
        _note_next_page(limit, page.next_cursor)
        return
    found = _run(ctx, lambda runtime: runtime.models.summaries(limit=limit, cursor=cursor))
    table = _table("NAME", "FORMATS", "SIZE", "QUANT", "DIGEST", "PINNED", "STATE")
    for model in found.models:
        digest = model.first_digest.removeprefix("sha256:")[:12] if model.first_digest else "-"
        table.add_row(
            str(model.name),
            ",".join(model.formats),
            _human(model.size_bytes),
            str(model.capabilities.get("quantization", "-")),
            digest,
            "yes" if model.pinned else "",
            model.state,
        )
    stdout.print(table)
    _note_next_page(limit, found.next_cursor)


def _note_next_page(limit: int | None, next_cursor: str | None) -> None:
    if next_cursor is not None:
        stderr.print(f"more models follow: appliance models ls --limit {limit} --cursor {next_cursor}")


@models.command("show")
@click.argument("name")
@json_option
@click.pass_context
def show_model(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one model: capabilities, artifacts, digests.

    Example: appliance models show tinyllama:1.1b
    """
    from appliance.models.schemas import ModelOut

    model = ModelOut.of(_run(ctx, lambda runtime: runtime.models.get(name)))
    if as_json:
        _emit_json(model.model_dump(mode="json"))
        return
    click.echo(f"name:        {model.name}")
    click.echo(f"size:        {_human(model.size_bytes)} ({model.size_bytes} bytes)")
    click.echo(f"state:       {model.state}{'  (pinned)' if model.pinned else ''}")
    click.echo(f"last used:   {model.last_used_at}")
    for key, value in sorted(model.capabilities.items()):
        click.echo(f"{key + ':':<22} {value}")
    for artifact in model.artifacts:
        click.echo(
            f"artifact:    {artifact.filename} [{artifact.format}] {artifact.digest} {artifact.size_bytes}"
        )


@models.command("rm")
@click.argument("name")
@click.pass_context
def remove_model(ctx: click.Context, name: str) -> None:
    """Remove a model; blobs other models share are kept.

    Example: appliance models rm tinyllama:1.1b
    """
    freed = _run(ctx, lambda runtime: runtime.models.remove(name, _cli_context()))
    click.echo(f"removed {name} (freed {_human(freed)})")


@models.command("verify")
@click.argument("name", required=False)
@json_option
@click.pass_context
def verify_models(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Re-hash blobs (one model's, or all). A mismatch is quarantined and exits 1.

    Example: appliance models verify
    """
    from appliance.models.schemas import VerifyOut

    results = _run(ctx, lambda runtime: runtime.models.verify(_cli_context(), name=name))
    if as_json:
        _emit_json([VerifyOut.of(result).model_dump(mode="json") for result in results])
    else:
        for result in results:
            status = "ok" if result.ok else "FAILED"
            click.echo(
                f"{status:<7} {result.digest} {', '.join(result.models)}"
                + ("" if result.ok else f": {result.detail}")
            )
    if not all(result.ok for result in results):
        _print_error(
            "verification failed; the bad blobs are quarantined",
            "remove the affected models and import them again",
        )
        ctx.exit(1)


@models.command("pin")
@click.argument("name")
@click.pass_context
def pin_model(ctx: click.Context, name: str) -> None:
    """Pin a model: eviction never removes it.

    Example: appliance models pin tinyllama:1.1b
    """
    model = _run(ctx, lambda runtime: runtime.models.set_pinned(name, True, _cli_context()))
    click.echo(f"pinned {model.name}")


@models.command("unpin")
@click.argument("name")
@click.pass_context
def unpin_model(ctx: click.Context, name: str) -> None:
    """Unpin a model: eviction may remove it again.

    Example: appliance models unpin tinyllama:1.1b
    """
    model = _run(ctx, lambda runtime: runtime.models.set_pinned(name, False, _cli_context()))
    click.echo(f"unpinned {model.name}")


@models.command("gc")
@json_option
@click.pass_context
def collect_garbage(ctx: click.Context, as_json: bool) -> None:
    """Remove orphan blobs and stale partial files; evict down to models.cache.max_bytes.

    Example: appliance models gc
    """
    from appliance.models.schemas import GcOut

    report = GcOut.of(_run(ctx, lambda runtime: runtime.models.gc(_cli_context())))
    if as_json:
        _emit_json(report.model_dump(mode="json"))
        return
    click.echo(
        f"freed {_human(report.freed_bytes)}: {report.orphan_blobs} orphan blobs, "
        f"{report.stale_partials} stale partial files, {len(report.evicted)} models evicted"
    )
    for digest in report.missing:
        click.echo(f"missing: {digest} is registered but not on disk; run `appliance models verify`")


@models.command("load")
@click.argument("name")
@click.option("--keep-alive", help="How long it stays loaded when idle: seconds, '5m', '1h'; -1 keeps it.")
@click.option(
    "--context",
    "context_length",
    type=click.IntRange(min=1),
    help="Tokens per request (capped at the model's); reloads an idle model loaded with another.",
)
@host_option
@port_option
@click.pass_context
def load_model(
    ctx: click.Context,
    name: str,
    keep_alive: str | None,
    context_length: int | None,
    host: str | None,
    port: int | None,
) -> None:
    """Load a model into the running server's engine now, rather than on its first request.

    Example: appliance models load tinyllama:1.1b --keep-alive 1h --context 8192
    """
    body: dict[str, Any] = {"name": name, "keep_alive": keep_alive, "context_length": context_length}
    with _server(ctx, host, port) as server:
        loaded = server.request("POST", "/api/v1/models/load", json=body)
    click.echo(
        f"loaded {loaded['name']} ({_human(loaded['memory_bytes'])}, context {loaded['context_length']})"
    )


@models.command("unload")
@click.argument("name")
@host_option
@port_option
@click.pass_context
def unload_model(ctx: click.Context, name: str, host: str | None, port: int | None) -> None:
    """Unload a model from the running server's engine.

    Example: appliance models unload tinyllama:1.1b
    """
    with _server(ctx, host, port) as server:
        unloaded = server.request("POST", "/api/v1/models/unload", json={"name": name})["unloaded"]
    click.echo(f"unloaded {name}" if unloaded else f"{name} was not loaded")


@cli.command("ps")
@json_option
@host_option
@port_option
@click.pass_context
def ps(ctx: click.Context, as_json: bool, host: str | None, port: int | None) -> None:
    """Show the models loaded in the running server.

    Example: appliance ps --port 8080
    """
    with _server(ctx, host, port) as server:
        state = server.request("GET", "/api/v1/ps")
    if as_json:
        _emit_json(state)
        return
    table = _table("NAME", "MEMORY", "CONTEXT", "GPU LAYERS", "PARALLEL", "ACTIVE", "QUEUED", "UNLOADS IN")
    for loaded in state["models"]:
        expires = loaded["expires_in_seconds"]
        table.add_row(
            loaded["name"],
            _human(loaded["memory_bytes"]),
            str(loaded["context_length"]),
            str(loaded["gpu_layers"]),
            str(loaded["parallel"]),
            str(loaded["active_requests"]),
            str(loaded["queued_requests"]),
            "never" if expires is None else f"{expires:.0f} s",
        )
    stdout.print(table)


# -- downloads --------------------------------------------------------------------------------


@cli.group()
def downloads() -> None:
    """Pulls that need the network: progress, approval."""


@downloads.command("ls")
@click.option(
    "--state",
    "states",
    multiple=True,
    help=f"Only this state; repeatable. One of: {', '.join(DOWNLOAD_STATES)}.",
)
@json_option
@click.pass_context
def list_downloads(ctx: click.Context, states: tuple[str, ...], as_json: bool) -> None:
    """List downloads, newest first.

    Example: appliance downloads ls --state pending
    """
    from appliance.provision.schemas import DownloadOut
    from appliance.queries import check_download_states

    checked = check_download_states(states)
    found = _run(ctx, lambda runtime: runtime.provisioner.list_downloads(states=checked))
    if as_json:
        _emit_json([DownloadOut.of(download).model_dump(mode="json") for download in found])
        return
    table = _table("ID", "REF", "NAME", "STATE", "DONE", "TOTAL", "UPDATED", pad_edge=False)
    for download in found:
        table.add_row(
            download.id,
            download.ref,
            download.model_name or "-",
            download.state
            + (f": {download.error}" if download.error else "")
            + (f" ({download.note})" if download.note else ""),
            _human(download.bytes_done),
            _human(download.bytes_total),
            download.updated_at,
        )
    stdout.print(table)


def _decide(ctx: click.Context, download_id: str, approve: bool) -> None:
    decided = _run(
        ctx, lambda runtime: runtime.provisioner.decide(download_id, approve=approve, context=_cli_context())
    )
    click.echo(f"{decided.state} download {decided.id} of {decided.ref}")


@downloads.command("approve")
@click.argument("download_id")
@click.pass_context
def approve_download(ctx: click.Context, download_id: str) -> None:
    """Let a pending download go ahead (when models.download.require_user_approval is on).

    Example: appliance downloads approve 3f2a9c01b7de
    """
    _decide(ctx, download_id, approve=True)


@downloads.command("deny")
@click.argument("download_id")
@click.pass_context
def deny_download(ctx: click.Context, download_id: str) -> None:
    """Refuse a pending download; the waiting pull fails with download_denied.

    Example: appliance downloads deny 3f2a9c01b7de
    """
    _decide(ctx, download_id, approve=False)


@downloads.command("cancel")
@click.argument("download_id")
@click.pass_context
def cancel_download(ctx: click.Context, download_id: str) -> None:
    """Cancel a pending or running pull, whichever process or server runs it; its finished
    parts stay for the next pull of the ref.

    Example: appliance downloads cancel 3f2a9c01b7de
    """
    cancelled = _run(ctx, lambda runtime: runtime.provisioner.cancel(download_id, _cli_context()))
    click.echo(f"cancelled download {cancelled.id} of {cancelled.ref}")


# -- preferences ------------------------------------------------------------------------------


@cli.group()
def prefs() -> None:
    """Preferences: settings an admin may change while the appliance runs."""


@prefs.command("ls")
@json_option
@click.pass_context
def list_prefs(ctx: click.Context, as_json: bool) -> None:
    """List the preferences with the value in effect and the setting it overrides.

    Example: appliance prefs ls
    """
    found = _run(ctx, lambda runtime: runtime.preferences.list())
    if as_json:
        _emit_json([preference.__dict__ for preference in found])
        return
    table = _table("KEY", "VALUE", "SETTING", "", pad_edge=False)
    for preference in found:
        shown = json.dumps(preference.value)
        table.add_row(
            preference.key, shown, json.dumps(preference.setting), "set" if preference.overridden else ""
        )
    stdout.print(table)


# A VALUE such as -5 is a value to validate, not an unknown option.
@prefs.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value")
@click.pass_context
def set_pref(ctx: click.Context, key: str, value: str) -> None:
    """Set a preference; VALUE is JSON (true, 5, ["https"]) or else taken as a string.

    Example: appliance prefs set models.cache.max_bytes 500GB
    """
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    preference = _run(ctx, lambda runtime: runtime.preferences.set(key, parsed, _cli_context()))
    click.echo(f"{preference.key} = {json.dumps(preference.value)}")


@prefs.command("unset")
@click.argument("key")
@click.pass_context
def unset_pref(ctx: click.Context, key: str) -> None:
    """Remove a preference, so the setting applies again.

    Example: appliance prefs unset offline
    """
    preference = _run(ctx, lambda runtime: runtime.preferences.set(key, None, _cli_context()))
    click.echo(f"{preference.key} = {json.dumps(preference.value)} (the setting)")


# -- audit ------------------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Read the audit log."""


@audit.command("ls")
@click.option("--action", help="e.g. models.import, models.delete, models.evict")
@click.option("--actor", help="e.g. cli:alice, api:127.0.0.1")
@click.option("--since", help="ISO 8601, inclusive (e.g. 2026-11-01 or 2026-11-01T09:30:00Z)")
@click.option("--until", help="ISO 8601, exclusive")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@click.pass_context
def list_audit(
    ctx: click.Context,
    action: str | None,
    actor: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List audit events, newest first.

    Example: appliance audit ls --action models.import --limit 10
    """
    from appliance.audit import AuditService
    from appliance.queries import parse_timestamp

    start = parse_timestamp(since) if since is not None else None
    end = parse_timestamp(until) if until is not None else None
    rows = _run(
        ctx,
        lambda runtime: AuditService(runtime.store).list_events(
            action=action, actor=actor, since=start, until=end, limit=limit
        ),
    )
    if as_json:
        _emit_json([row.model_dump(mode="json") for row in rows])
        return
    table = _table("AT", "ACTOR", "ACTION", "TARGET", "OUTCOME", "BYTES", "MS")
    for row in rows:
        table.add_row(
            row.at,
            row.actor,
            row.action,
            row.target,
            row.outcome,
            _human(row.bytes),
            str(row.duration_ms or 0),
        )
    stdout.print(table)


# -- system ---------------------------------------------------------------------------------


@cli.command("system")
@json_option
@click.pass_context
def system(ctx: click.Context, as_json: bool) -> None:
    """What this host and this build have: CPUs, RAM, GPUs, the llama.cpp build and its devices.

    Example: appliance system
    """
    from appliance import hostinfo  # loads llama.cpp, which no other command here needs
    from appliance.engine.sizing import engine_choices
    from appliance.settings import secret_states

    def gather(runtime: Runtime) -> dict[str, Any]:
        facts = hostinfo.report(runtime.settings.data_dir)
        return {
            **facts,
            "engine": engine_choices(runtime.settings.engine, gpu_offload=facts["gpu_offload"]),
            "cache": runtime.models.cache_usage(),
            "secrets": secret_states(runtime.settings),
        }

    facts = _run(ctx, gather)
    if as_json:
        _emit_json(facts)
        return
    gpu_devices = [device for device in facts["devices"] if device["kind"] != "cpu"]
    memory = facts["memory"]
    lines = [
        f"appliance {__version__}, llama-cpp-python {facts['llama_cpp_version']}",
        f"CPUs: {facts['cpu_count']}, load {' '.join(f'{x:.2f}' for x in facts['load_average'])}",
        f"RAM: {_human(memory['available_bytes'])} free of {_human(memory['total_bytes'])}",
        "GPUs: "
        + (
            ", ".join(f"{gpu['name']} ({_human(gpu['vram_total_bytes'])})" for gpu in facts["gpus"]) or "none"
        ),
        "GPU backends built in: " + (", ".join(facts["gpu_backends"]) or "none (a CPU build)"),
        "llama.cpp devices: " + ", ".join(f"{d['name']} ({d['description']})" for d in facts["devices"]),
    ]
    if facts["gpu_backends"] and not gpu_devices:
        lines.append("no GPU: llama.cpp found no GPU it can use here, so models run on the CPU")
    cache = facts["cache"]
    lines.append(
        f"cache: {_human(cache['used_bytes'])} used of "
        f"{_human(cache['max_bytes']) if cache['max_bytes'] else 'no limit'}, "
        f"{_human(facts['disk_free_bytes'])} free on disk"
    )
    engine = facts["engine"]
    lines.append(f"threads per model: {engine['threads']} ({engine['threads_from']})")
    lines.append(f"requests decoded together per model: {engine['parallel']} ({engine['parallel_from']})")
    lines.append(f"llama.cpp: {facts['llama_cpp_system_info']}")
    lines.append("secrets: " + ", ".join(f"{key} {state}" for key, state in facts["secrets"].items()))
    for line in lines:
        stdout.print(_visible(line))


def main() -> None:
    cli(prog_name="appliance")


from appliance.cli_auth import keys, users  # noqa: E402 (it uses the helpers above)
from appliance.cli_bundle import bundle  # noqa: E402 (it uses the helpers above)
from appliance.cli_db import db  # noqa: E402 (it uses the helpers above)
from appliance.cli_importdir import import_dir  # noqa: E402 (it uses the helpers above)
from appliance.cli_login import login, logout  # noqa: E402
from appliance.cli_mcp import mcp_group  # noqa: E402 (it uses the helpers above)
from appliance.cli_nodes import nodes  # noqa: E402 (it uses the helpers above)
from appliance.cli_providers import providers  # noqa: E402 (it uses the helpers above)
from appliance.cli_servers import servers  # noqa: E402 (it uses the helpers above)
from appliance.cli_share import copy_model, push_model  # noqa: E402 (it uses the helpers above)
from appliance.cli_tasks import tasks  # noqa: E402
from appliance.cli_tls import tls  # noqa: E402
from appliance.cli_worker import worker  # noqa: E402

models.add_command(import_dir)
models.add_command(copy_model)
models.add_command(push_model)
cli.add_command(bundle)
cli.add_command(tls)
cli.add_command(users)
cli.add_command(keys)
cli.add_command(login)
cli.add_command(logout)
cli.add_command(tasks)
cli.add_command(nodes)
cli.add_command(servers)
cli.add_command(providers)
cli.add_command(mcp_group)
cli.add_command(worker)
cli.add_command(db)
