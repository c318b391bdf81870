"""The embedded store: SQLite through apsw.

WAL journal, foreign keys on, a busy timeout so several processes (the server and a CLI
command, say) share one file, and one writer: every write runs inside ``BEGIN IMMEDIATE``
behind a lock, while reads use a connection per thread. The SQL itself is ``SqlStore``'s.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw

from appliance.errors import DiskFull, StoreFailure
from appliance.store.base import LISTED_CAPABILITIES, utcnow
from appliance.store.feed import ChangeFeed, LocalFeed, Topic
from appliance.store.locks import Locks
from appliance.store.migrations import MIGRATIONS, Migration
from appliance.store.sql import SqlStore

__all__ = ["SqliteStore"]

BUSY_TIMEOUT_MS = 30_000
DISK_FULL_BYTES = 1024 * 1024  # below this much free space, an I/O error is the disk being full

_LISTED_PATHS = ", ".join(f"'$.{key}'" for key in LISTED_CAPABILITIES)


def _translate(exc: apsw.Error, path: Path) -> Exception:
    # On a full disk SQLite says FULL, or IOERR when it cannot grow its shared-memory file.
    if isinstance(exc, apsw.FullError) or (isinstance(exc, apsw.IOError) and _disk_full(path)):
        return DiskFull(f"the disk holding {path} is full")
    return StoreFailure(f"the registry database {path} failed: {exc}")


def _disk_full(path: Path) -> bool:
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < DISK_FULL_BYTES


def _enable_wal(connection: apsw.Connection) -> None:
    """Switch a new database to WAL. The switch needs an exclusive lock and SQLite does not call
    the busy handler for it, so processes opening a new file together retry here instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if connection.execute("PRAGMA journal_mode").fetchall() != [("wal",)]:
                connection.execute("PRAGMA journal_mode=WAL")
            # Keep -wal and -shm when the last connection closes: opening the file again then
            # needs no new disk space, so reads still work on a full disk.
            persist = ctypes.c_int(1)
            connection.file_control("main", apsw.SQLITE_FCNTL_PERSIST_WAL, ctypes.addressof(persist))
            return
        except apsw.BusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _Transaction:
    """The writer connection inside its ``BEGIN IMMEDIATE``."""

    def __init__(self, connection: apsw.Connection) -> None:
        self._connection = connection

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._connection.execute(sql, params))

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._connection.execute(sql, params)
        return int(self._connection.changes())

    def run_many(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self._connection.executemany(sql, params)


class SqliteStore(SqlStore):
    """Store on one SQLite file. Safe to share between threads and processes."""

    _INSERT_ORDER = "rowid"
    _NO_LIMIT = -1
    _LISTED_SQL = f"json_extract(v.capabilities, {_LISTED_PATHS})"

    def __init__(self, path: Path, *, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer = self._connect()
        self._feed = LocalFeed()
        self._migrate(migrations)

    # -- connections -------------------------------------------------------------------------

    def _connect(self) -> apsw.Connection:
        try:
            connection = apsw.Connection(str(self.path))
            connection.set_busy_timeout(BUSY_TIMEOUT_MS)
            _enable_wal(connection)
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA synchronous=FULL")
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    def _reader(self) -> apsw.Connection:
        connection: apsw.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def close(self) -> None:
        self._feed.close()
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def shared_locks(self) -> Locks | None:
        return None  # one machine's file: its processes share flock files in the data dir

    def change_feed(self) -> ChangeFeed:
        return self._feed

    @contextmanager
    def _write(self, *changes: Topic) -> Iterator[_Transaction]:
        with self._write_lock:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise _translate(exc, self.path) from exc
            try:
                yield _Transaction(self._writer)
            except apsw.Error as exc:
                self._rollback()
                raise _translate(exc, self.path) from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._writer.execute("COMMIT")
            except apsw.Error as exc:
                self._rollback()
                raise _translate(exc, self.path) from exc
        if changes:
            self._feed.bump(*changes)

    def _rollback(self) -> None:
        # SQLite has already rolled back after some errors (a full disk among them).
        if self._writer.in_transaction:
            self._writer.execute("ROLLBACK")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self._reader().execute(sql, params))
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply missing migrations; an up-to-date file is only read (so it opens on a full disk)."""
        tables = self._query("SELECT name FROM sqlite_master WHERE type = 'table'")
        if ("schema_migrations",) not in tables:
            with self._write() as db:
                db.run(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)"
                )
        applied = {row[0] for row in self._query("SELECT name FROM schema_migrations")}
        for migration in migrations:
            if migration.name in applied:
                continue
            with self._write() as db:
                # Another process may have applied it while we waited for the write lock.
                if db.rows("SELECT 1 FROM schema_migrations WHERE name = ?", (migration.name,)):
                    continue
                db.run(migration.sqlite)
                db.run(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, utcnow()),
                )
