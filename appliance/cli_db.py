"""``appliance db``: the registry's database: where it stands, its migrations, and a copy of a
SQLite registry into PostgreSQL (``appliance/store/admin.py`` does the work).

Operator actions on a database, not on a running server's: the HTTP API and the UI show the status
only. Attached to the ``appliance`` group by ``appliance/cli.py``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from appliance.cli import _emit_json, _table, stderr, stdout
from appliance.errors import InvalidInput

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from appliance.settings import Settings

__all__ = ["db"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
def db() -> None:
    """The registry's database: its status, its migrations, a copy of it into PostgreSQL."""


@db.command("status")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the store's backend, where it is (never a password), its schema version, the
    migrations pending and each table's rows. Reads only: nothing is created or migrated.

    Example: appliance db status --json
    """
    from appliance.store import admin

    found = admin.status(ctx.obj["settings"]())
    if as_json:
        _emit_json(asdict(found))
        return
    stdout.print(f"backend: {found.backend}")
    stdout.print(f"location: {found.location}")
    if found.schema_name is not None:
        stdout.print(f"schema: {found.schema_name}")
    stdout.print(f"schema version: {found.schema_version or 'none (no migration applied)'}")
    stdout.print(f"pending migrations: {', '.join(found.pending) or 'none'}")
    if found.newer:
        stdout.print(f"applied by a newer appliance: {', '.join(found.newer)}")
    table = _table("TABLE", "ROWS")
    for name, rows in found.tables.items():
        table.add_row(name, str(rows))
    stdout.print(table)


@db.command("migrate")
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Apply the migrations this appliance has and the database has not (a server starting does
    too), and name them. A SQLite file that does not exist yet is made.

    Example: appliance db migrate
    """
    from appliance.store import admin

    applied = admin.migrate(ctx.obj["settings"]())
    if applied:
        stdout.print(f"applied {len(applied)} migrations: {', '.join(applied)}")
    else:
        stdout.print("up to date: no migration pending")


@db.command("copy")
@click.option(
    "--to", "target", required=True, help="The PostgreSQL database: postgresql://USER[:PASSWORD]@HOST/DB."
)
@click.option(
    "--from",
    "source",
    type=click.Path(path_type=Path),
    help="The SQLite registry to copy (default: store.url when it names a file, else DATA_DIR/appliance.db).",
)
@json_option
@click.pass_context
def copy(ctx: click.Context, target: str, source: Path | None, as_json: bool) -> None:
    """Copy every table of a SQLite registry into a PostgreSQL database, in one transaction: the
    target is migrated first, rows it already holds are kept, and before it commits every table
    and the blob digests are checked to equal the source's (else nothing is kept). Safe to re-run.

    The blobs stay in the data dir: servers on the database serve them from their caches. Copy a
    stopped server's registry (a live one's is read as one snapshot, but its later writes stay behind).

    Example: appliance db copy --to postgresql://appliance@db.lan/appliance
    """
    from appliance.settings import POSTGRES_SCHEMES
    from appliance.store import admin

    if target.partition("://")[0] not in POSTGRES_SCHEMES:
        raise InvalidInput(
            "db copy copies into PostgreSQL: --to takes a postgresql:// URL",
            hint="write it as postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        )
    settings: Settings = ctx.obj["settings"]()
    path = source or admin.sqlite_path(settings) or settings.data_dir / "appliance.db"
    show_progress = stderr.is_terminal and not as_json
    progress = _rows_progress()
    tasks: dict[str, TaskID] = {}

    def on_progress(table: str, done: int, total: int) -> None:
        if table not in tasks:
            tasks[table] = progress.add_task(table, total=total)
        progress.update(tasks[table], completed=done)

    with progress if show_progress else nullcontext():
        report = admin.copy(path, target, progress=on_progress if show_progress else None)
    if as_json:
        _emit_json(asdict(report))
        return
    table = _table("TABLE", "ROWS", "COPIED", "ALREADY THERE")
    for copied in report.tables:
        table.add_row(copied.name, str(copied.rows), str(copied.copied), str(copied.already))
    stdout.print(table)
    if report.left_behind:
        stdout.print(f"not copied (each database's own): {', '.join(report.left_behind)}")
    stdout.print(f"blobs digest: {report.blobs_digest}")
    stdout.print(f"artifacts digest: {report.artifacts_digest}")
    stdout.print(
        f"copied {report.copied} rows from {report.source} to {report.target} in {report.seconds:.1f} s;"
        " every table verified"
    )


def _rows_progress() -> Progress:
    from appliance.cli import _LazyConsole  # here: at import time mypy cannot type the cycle
    from appliance.cli_rich import make_count_progress

    # Rich itself gets the console, not the stand-in: it enters it as a context manager.
    return make_count_progress(cast(_LazyConsole, stderr).console)
