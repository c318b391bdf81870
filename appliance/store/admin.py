"""What ``appliance db`` does to a registry's database: say where it stands, migrate it, and copy a
SQLite registry into PostgreSQL. The only SQL outside the backends is here.

- ``status``: the backend, where it is (a URL's password masked), the migrations applied and
  pending, each table's rows. It only reads: a SQLite file is opened read-only (with sqlite-utils),
  a PostgreSQL schema through a plain connection; neither is created or migrated.
- ``migrate``: open the store, which applies what is pending, and say what that was.
- ``copy``: every table of a SQLite file (at this build's schema) into a PostgreSQL database
  (migrated first), in one transaction: all or nothing. The source is read in one read transaction
  (a live server's file gives one consistent snapshot). Rows are streamed through ``COPY`` into a
  temporary table with the target table's types, then inserted with ``ON CONFLICT DO NOTHING``, so
  a re-run adds nothing twice. Before it commits, each table of the target must hold exactly the
  source's rows (compared by PostgreSQL, value by value, in the target's types) and the blob digests
  must match; otherwise nothing is kept and the error names the table.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import psycopg
import sqlite_utils
from psycopg import sql

from appliance.errors import Conflict, InvalidInput, NotFound, SourceNotFound, StoreFailure
from appliance.settings import POSTGRES_SCHEMES, Settings
from appliance.store.factory import open_store
from appliance.store.migrations import MIGRATIONS
from appliance.store.postgres import PostgresStore, display_url

__all__ = [
    "CopyProgress",
    "CopyReport",
    "DbStatus",
    "TableCopy",
    "copy",
    "migrate",
    "sqlite_path",
    "status",
]

Backend = Literal["sqlite", "postgresql"]
# Called as each table's rows go across: (table, rows sent so far, rows in the source's table).
CopyProgress = Callable[[str, int, int], None]

CONNECT_TIMEOUT_S = 10
BATCH_ROWS = 1000
# Each database's own: which migrations it has. Not a table status counts.
_BOOKKEEPING = frozenset({"schema_migrations"})
# What a copy never carries to another database: its bookkeeping, and which servers run on it (each
# registers itself on the database it serves from, and keeps its row fresh while it runs).
_NOT_COPIED = _BOOKKEEPING | {"servers"}
# A counter the target's own writes move (every model row the copy inserts bumps it): its row is
# counted, never compared value by value.
_COUNTERS = frozenset({"registry_generation"})


@dataclass(frozen=True)
class DbStatus:
    backend: Backend
    location: str  # the file's path, or the URL with its password masked
    schema_name: str | None  # PostgreSQL's schema the URL's search_path lands in; None for SQLite
    schema_version: str | None  # the last migration applied; None before the first
    applied: list[str]
    pending: list[str]  # this build's migrations not applied yet
    newer: list[str]  # applied by a newer build: this one does not know them
    tables: dict[str, int]  # rows per table, by name


@dataclass(frozen=True)
class TableCopy:
    name: str
    rows: int  # in the source
    copied: int  # new in the target; the others were there already

    @property
    def already(self) -> int:
        return self.rows - self.copied


@dataclass(frozen=True)
class CopyReport:
    source: str
    target: str  # password masked
    tables: list[TableCopy]
    left_behind: list[str]  # the source's tables a copy never carries (each database's own)
    blobs_digest: str  # of the sorted blob digests, the same on both sides
    artifacts_digest: str  # of the sorted artifacts' sha256 column, the same on both sides
    seconds: float
    copied: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "copied", sum(table.copied for table in self.tables))


# -- where a store is --------------------------------------------------------------------------


def sqlite_path(settings: Settings) -> Path | None:
    """The SQLite file the settings' store is, or None when it is a PostgreSQL database."""
    url = settings.store.url
    if url is None:
        return settings.data_dir / "appliance.db"
    scheme, _, rest = url.partition("://")
    return None if scheme in POSTGRES_SCHEMES else Path(rest)


# -- status and migrate ------------------------------------------------------------------------


def status(settings: Settings) -> DbStatus:
    """Where the settings' store stands; reads only (a missing SQLite file is an error, not made)."""
    path = sqlite_path(settings)
    if path is not None:
        with _sqlite(path) as db:
            return _sqlite_status(db, path)
    url = settings.store.url
    assert url is not None  # sqlite_path says None only for a URL
    with _postgres(url) as connection:
        return _postgres_status(connection, url)


def migrate(settings: Settings) -> list[str]:
    """Apply the pending migrations (opening the store does) and return their names; a SQLite
    file that does not exist yet is made."""
    path = sqlite_path(settings)
    before: set[str] = set()
    if path is None or path.exists():
        before = set(status(settings).applied)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    try:
        return [name for name in store.applied_migrations() if name not in before]
    finally:
        store.close()


def _describe(
    backend: Backend, location: str, schema: str | None, applied: list[str], tables: dict[str, int]
) -> DbStatus:
    known = [migration.name for migration in MIGRATIONS]
    return DbStatus(
        backend=backend,
        location=location,
        schema_name=schema,
        schema_version=applied[-1] if applied else None,
        applied=applied,
        pending=[name for name in known if name not in applied],
        newer=[name for name in applied if name not in known],
        tables=dict(sorted(tables.items())),
    )


@contextmanager
def _sqlite(path: Path) -> Iterator[sqlite_utils.Database]:
    """The file, read-only, inside one read transaction: what it reads is one snapshot."""
    if not path.is_file():
        raise SourceNotFound(
            f"no SQLite registry at {path}",
            hint="pass the data dir (--data-dir) or file (--from) that holds it; `appliance db migrate`"
            " (or `appliance serve`) makes a new one",
        )
    # Opened lazily: a file it cannot read fails at the first read, below.
    connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None)
    try:
        connection.execute("BEGIN")
        db = sqlite_utils.Database(connection, recursive_triggers=False, execute_plugins=False)
        db.table_names()  # a file that is not a database fails here, not halfway through
        yield db
    except sqlite3.Error as exc:
        raise StoreFailure(
            f"cannot read the SQLite registry {path}: {exc}",
            hint="is it an appliance registry (appliance.db)?",
        ) from exc
    finally:
        connection.close()


def _sqlite_applied(db: sqlite_utils.Database) -> list[str]:
    if not db["schema_migrations"].exists():
        return []
    return [row[0] for row in db.execute("SELECT name FROM schema_migrations ORDER BY id").fetchall()]


def _sqlite_tables(db: sqlite_utils.Database) -> list[str]:
    return [name for name in db.table_names() if not name.startswith("sqlite_") and name not in _BOOKKEEPING]


def _sqlite_status(db: sqlite_utils.Database, path: Path) -> DbStatus:
    counts = {name: db.table(name).count for name in _sqlite_tables(db)}
    return _describe("sqlite", str(path), None, _sqlite_applied(db), counts)


def _failure(url: str, exc: psycopg.Error) -> StoreFailure:
    """A driver error as ours: the URL masked, and the password kept out of the message."""
    reason = str(exc).strip() or type(exc).__name__
    password = urlsplit(url).password
    if password:
        reason = reason.replace(password, "***")
    return StoreFailure(
        f"the PostgreSQL database {display_url(url)} failed: {reason}",
        hint="check that the server runs and is reachable, and the URL's user, database and password",
    )


@contextmanager
def _postgres(url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A plain connection (no pool, no migrating), inside one transaction rolled back at the end."""
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
            try:
                yield connection
            finally:
                connection.rollback()  # it only read
    except psycopg.Error as exc:
        raise _failure(url, exc) from exc


def _postgres_schema(connection: psycopg.Connection[tuple[Any, ...]], url: str) -> str:
    row = connection.execute("SELECT current_schema()").fetchone()
    if row is None or row[0] is None:
        raise NotFound(
            f"the PostgreSQL database {display_url(url)} has no schema on its search_path",
            hint="create the schema, or name one that exists in the URL (options=-csearch_path=NAME)",
        )
    schema: str = row[0]
    return schema


def _postgres_tables(connection: psycopg.Connection[tuple[Any, ...]]) -> list[str]:
    rows = connection.execute(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
    ).fetchall()
    return sorted(row[0] for row in rows if row[0] not in _BOOKKEEPING)


def _postgres_applied(connection: psycopg.Connection[tuple[Any, ...]]) -> list[str]:
    found = connection.execute("SELECT to_regclass('schema_migrations')").fetchone()
    if found is None or found[0] is None:
        return []
    # Names start with their number: by name is the order they were applied in.
    return sorted(row[0] for row in connection.execute("SELECT name FROM schema_migrations").fetchall())


def _postgres_count(connection: psycopg.Connection[tuple[Any, ...]], table: str) -> int:
    row = connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    assert row is not None
    count: int = row[0]
    return count


def _postgres_status(connection: psycopg.Connection[tuple[Any, ...]], url: str) -> DbStatus:
    schema = _postgres_schema(connection, url)
    counts = {table: _postgres_count(connection, table) for table in _postgres_tables(connection)}
    return _describe("postgresql", display_url(url), schema, _postgres_applied(connection), counts)


# -- copy ---------------------------------------------------------------------------------------


def copy(source: Path, target_url: str, *, progress: CopyProgress | None = None) -> CopyReport:
    """Copy the SQLite registry ``source`` into the PostgreSQL database ``target_url`` (module
    docstring); raises, having changed nothing, where the target would not equal the source."""
    started = time.monotonic()
    with _sqlite(source) as db:
        _check_source_schema(db, source)
        tables = _copy_order(db)
        left_behind = sorted(set(_sqlite_tables(db)) - set(tables))
        try:
            store = PostgresStore(target_url)  # migrates the target first
        except StoreFailure as exc:
            raise StoreFailure(exc.message, hint="check the target's URL, and that its server is up") from exc
        try:
            with store.connection() as connection:
                try:
                    copied = [_copy_one(db, connection, table, source, progress) for table in tables]
                    blobs, artifacts = _check_digests(db, connection, target_url)
                except psycopg.Error as exc:
                    raise _failure(target_url, exc) from exc
        finally:
            store.close()
    return CopyReport(
        source=str(source),
        target=display_url(target_url),
        tables=copied,
        left_behind=left_behind,
        blobs_digest=blobs,
        artifacts_digest=artifacts,
        seconds=time.monotonic() - started,
    )


def _check_source_schema(db: sqlite_utils.Database, source: Path) -> None:
    state = _describe("sqlite", str(source), None, _sqlite_applied(db), {})
    if state.newer:
        raise InvalidInput(
            f"the SQLite registry {source} was migrated by a newer appliance"
            f" ({', '.join(state.newer)} is unknown here)",
            hint="copy it with that newer appliance",
        )
    if state.pending:
        at = state.schema_version or "no migration"
        raise InvalidInput(
            f"the SQLite registry {source} is at {at}, behind this appliance's schema"
            f" ({len(state.pending)} migrations pending: {', '.join(state.pending)})",
            hint=f"migrate it first: appliance db migrate (with --data-dir or store.url naming {source})",
        )


def _copy_order(db: sqlite_utils.Database) -> list[str]:
    """The source's tables, each after those its foreign keys reference."""
    names = sorted(name for name in _sqlite_tables(db) if name not in _NOT_COPIED)
    graph = TopologicalSorter(
        {name: sorted({key.other_table for key in db.table(name).foreign_keys}) for name in names}
    )
    return [name for name in graph.static_order() if name in names]


def _copy_one(
    db: sqlite_utils.Database,
    connection: psycopg.Connection[tuple[Any, ...]],
    table: str,
    source: Path,
    progress: CopyProgress | None,
) -> TableCopy:
    try:
        return _copy_table(db, connection, table, progress)
    except psycopg.DataError as exc:
        # SQLite keeps any value in any column; PostgreSQL checks each against the column's type.
        raise InvalidInput(
            f"the SQLite registry {source} holds a value in {table} that PostgreSQL refuses:"
            f" {str(exc).strip()}; nothing was copied",
            hint="fix or remove that row in the source, then copy again",
        ) from exc


def _copy_table(
    db: sqlite_utils.Database,
    connection: psycopg.Connection[tuple[Any, ...]],
    table: str,
    progress: CopyProgress | None,
) -> TableCopy:
    columns = [column.name for column in db.table(table).columns]
    total = db.table(table).count
    target = sql.Identifier(table)
    staged = sql.Identifier(f"copy_{table}")
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    identities = [column for column in _identity_columns(connection, table) if column in columns]
    with connection.cursor() as cursor:
        # The copied columns with the target's types (and collations), and no constraint: PostgreSQL
        # parses the values as the target's and compares them so.
        cursor.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                staged, names, target
            )
        )
        sent = 0
        with cursor.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(staged, names)) as stream:
            for batch in _batches(db.execute(_select(table, columns))):
                for row in batch:
                    stream.write_row(row)
                sent += len(batch)
                if progress is not None:
                    progress(table, sent, total)
        # Identity columns are copied as they are (an audit event keeps its id).
        overriding = sql.SQL("OVERRIDING SYSTEM VALUE ") if identities else sql.SQL("")
        cursor.execute(
            sql.SQL("INSERT INTO {} ({}) {}SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
                target, names, overriding, names, staged
            )
        )
        copied = max(cursor.rowcount, 0)
        for column in identities:
            _move_sequence_past(cursor, table, column)
        _check_table(cursor, table, columns, total)
    if progress is not None and total == 0:
        progress(table, 0, 0)
    return TableCopy(name=table, rows=total, copied=copied)


def _select(table: str, columns: Sequence[str]) -> str:
    """SQLite's SELECT of ``columns`` of ``table``, quoted, in the order the rows were written (a
    target column numbered as rows arrive, like downloads' insertion order, keeps that order)."""
    quoted = ", ".join(f'"{column}"' for column in columns)
    return f'SELECT {quoted} FROM "{table}" ORDER BY rowid'


def _batches(cursor: sqlite3.Cursor) -> Iterator[list[Any]]:
    while batch := cursor.fetchmany(BATCH_ROWS):
        yield batch


def _identity_columns(connection: psycopg.Connection[tuple[Any, ...]], table: str) -> list[str]:
    """The columns a sequence numbers (identity or serial)."""
    rows = connection.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s"
        " AND (is_identity = 'YES' OR column_default LIKE 'nextval(%%')",
        (table,),
    ).fetchall()
    return [row[0] for row in rows]


def _move_sequence_past(cursor: psycopg.Cursor[tuple[Any, ...]], table: str, column: str) -> None:
    """The column's sequence set to its largest value, so the next row numbered gets a new one."""
    cursor.execute(
        sql.SQL(
            "SELECT setval(pg_get_serial_sequence(%s, %s), max_value)"
            " FROM (SELECT max({}) AS max_value FROM {}) AS largest WHERE max_value IS NOT NULL"
        ).format(sql.Identifier(column), sql.Identifier(table)),
        (table, column),
    )


def _check_table(
    cursor: psycopg.Cursor[tuple[Any, ...]], table: str, columns: Sequence[str], rows: int
) -> None:
    """The target's table holds the source's rows, no more, each with the source's values."""
    target = sql.Identifier(table)
    cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(target))
    found = cursor.fetchone()
    assert found is not None
    if found[0] != rows:
        raise Conflict(
            f"the copy's table {table} would hold {found[0]} rows, the source's {rows}: the target"
            " already holds rows the source has not; nothing was copied",
            hint="copy into an empty database (or schema), or one copied from this same file",
        )
    if table in _COUNTERS:
        return
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    cursor.execute(
        sql.SQL("SELECT count(*) FROM (SELECT {} FROM {} EXCEPT ALL SELECT {} FROM {}) AS differing").format(
            names, sql.Identifier(f"copy_{table}"), names, target
        )
    )
    differing = cursor.fetchone()
    assert differing is not None
    if differing[0]:
        raise Conflict(
            f"the copy's table {table} differs from the source: {differing[0]} of its rows are held"
            " with other values in the target (the same keys, other rows); nothing was copied",
            hint="copy into an empty database (or schema), or one copied from this same file"
            " (and stop the server writing the source while you copy)",
        )


def _digest(values: Iterable[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(sorted(values)).encode()).hexdigest()


def _check_digests(
    db: sqlite_utils.Database, connection: psycopg.Connection[tuple[Any, ...]], target_url: str
) -> tuple[str, str]:
    """The blob digests and the artifacts' sha256 values, as sorted lists hashed, equal on both sides."""
    found: list[str] = []
    for table, column in (("blobs", "digest"), ("model_artifacts", "sha256")):
        source = _digest(row[0] for row in db.execute(f'SELECT "{column}" FROM "{table}"'))
        query = sql.SQL("SELECT {} FROM {}").format(sql.Identifier(column), sql.Identifier(table))
        target = _digest(row[0] for row in connection.execute(query))
        if source != target:
            raise Conflict(
                f"the digests of {table} in {display_url(target_url)} differ from the source's after the"
                " copy; nothing was copied",
                hint="copy into an empty database (or schema), or one copied from this same file",
            )
        found.append(source)
    return found[0], found[1]
