"""The store several servers share: PostgreSQL through psycopg 3 and its connection pool.

The SQL is ``SqlStore``'s; this module connects, runs transactions and migrates, and gives what
servers on one database need from each other:

- ``shared_locks()``: advisory locks, each held on a connection of its own (not the pool's), so a
  process that dies frees its locks with its connection.
- ``change_feed()``: one LISTEN connection per store, in a thread; every write that changes a
  topic's rows sends ``pg_notify(channel, topic)`` in its own transaction, so each server's
  counters move on every server's writes.

Advisory locks and notification channels are database-wide: both are named after the schema the
store works in (``current_schema()``, from the URL's ``search_path``), so stores in other
schemas of the same database never meet. Registry writes run one at a time across servers (a
transaction-scoped advisory lock): they read, check and then insert, as SQLite's single writer does.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.rows import TupleRow
from psycopg.sql import SQL, Identifier
from psycopg_pool import ConnectionPool

from appliance.errors import ApplianceError, DiskFull, StoreFailure
from appliance.store.base import LISTED_CAPABILITIES, utcnow
from appliance.store.feed import TOPICS, ChangeFeed, LocalFeed, Topic
from appliance.store.locks import Locks
from appliance.store.migrations import MIGRATIONS, Migration
from appliance.store.sql import SqlStore

__all__ = ["AdvisoryLocks", "NotifyFeed", "PostgresStore", "advisory_key", "display_url"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
POOL_MAX_SIZE = 10
CONNECTION_HINT = "check store.url / APPLIANCE_STORE__URL, and that the server is up"
_DISK_FULL = "53100"
_LISTED_SQL = (
    "json_build_array("
    + ", ".join(f"v.capabilities::json -> '{key}'" for key in LISTED_CAPABILITIES)
    + ")::text"
)


def display_url(url: str) -> str:
    """``url`` with its password (in the user part or the query) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def advisory_key(schema: str, key: str) -> int:
    """The advisory lock id of ``key`` in ``schema``: a signed 64-bit hash of both."""
    digest = hashlib.blake2b(f"{schema}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _channel(schema: str) -> str:
    return "appliance_" + hashlib.sha256(schema.encode()).hexdigest()[:16]


@lru_cache(maxsize=512)
def _dialect(statement: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return statement.replace("%", "%%").replace("?", "%s")


def _statement(statement: str, params: Sequence[Any]) -> tuple[str, Sequence[Any] | None]:
    # Without parameters psycopg sends the text as it is: a migration's several statements too.
    return (_dialect(statement), params) if params else (statement, None)


class _Transaction:
    """A pooled connection's cursor inside one transaction."""

    def __init__(self, cursor: psycopg.Cursor[TupleRow]) -> None:
        self._cursor = cursor

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(*_statement(sql, params))
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cursor.execute(*_statement(sql, params))
        return self._cursor.rowcount

    def run_many(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self._cursor.executemany(_dialect(sql), list(params))


class _Failures:
    """Turns psycopg's errors into the appliance's, naming the database without its password."""

    def __init__(self, url: str) -> None:
        self.display_url = display_url(url)
        password = urlsplit(url).password
        self._secrets = {password, unquote(password)} - {""} if password else set()

    def __call__(self, exc: psycopg.Error) -> ApplianceError:
        if exc.sqlstate == _DISK_FULL:
            return DiskFull(
                f"the disk of the PostgreSQL database {self.display_url} is full",
                hint="free disk space on the database server",
            )
        message = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:  # libpq does not echo it; should a message ever, it is masked
            message = message.replace(secret, "***")
        hint = (
            CONNECTION_HINT
            if isinstance(exc, psycopg.OperationalError)
            else "the PostgreSQL server's log says more"
        )
        return StoreFailure(f"the PostgreSQL database {self.display_url} failed: {message}", hint=hint)


class AdvisoryLocks:
    """PostgreSQL advisory locks: each held on an autocommit connection opened for it and closed
    when the block ends, so a process that dies (and its connection with it) frees its locks."""

    def __init__(self, url: str, *, schema: str) -> None:
        self._url = url
        self._schema = schema
        self._failures = _Failures(url)

    @contextmanager
    def hold(self, key: str, *, blocking: bool) -> Iterator[bool]:
        lock_id = advisory_key(self._schema, key)
        try:
            connection = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise self._failures(exc) from exc
        taken = False
        try:
            try:
                if blocking:
                    connection.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
                    taken = True
                else:
                    row = connection.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone()
                    taken = bool(row and row[0])
            except psycopg.Error as exc:
                raise self._failures(exc) from exc
            yield taken
        finally:
            if taken:
                # Freed before the block returns: closing alone frees it only once the server has
                # seen the session end, a moment later, when another server may already be trying.
                with suppress(psycopg.Error):
                    connection.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))
            connection.close()  # frees it anyway (a session lock ends with its session)


class NotifyFeed(LocalFeed):
    """Counters moved by this process's writes (``bump``) and by every notification on the
    schema's channel, which one LISTEN connection in a daemon thread receives. After the
    connection breaks it reconnects (backing off) and moves every counter: what changed
    meanwhile is unknown."""

    def __init__(self, url: str, *, channel: str) -> None:
        super().__init__()
        self._url = url
        self._channel = channel
        self._failures = _Failures(url)
        self._stop = threading.Event()
        self._tried = threading.Event()  # the first connection is listening, or failed
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Start listening, once; returns when the first connection listens or fails (the thread
        then keeps trying)."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="appliance-store-feed", daemon=True)
                self._thread.start()
        self._tried.wait(2 * CONNECT_TIMEOUT_S)

    def _listen(self) -> None:
        backoff = 0.1
        failed = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                ) as connection:
                    connection.execute(SQL("LISTEN {}").format(Identifier(self._channel)))
                    if failed:
                        log.info("listening to %s again", self._failures.display_url)
                        self.bump(*TOPICS)
                    failed, backoff = False, 0.1
                    self._tried.set()
                    while not self._stop.is_set():
                        for notification in connection.notifies(timeout=0.5):
                            if notification.payload in TOPICS:
                                self.bump(notification.payload)
            except psycopg.Error as exc:
                if not failed:
                    log.warning("%s; retrying", self._failures(exc).message)
                    failed = True
                self._tried.set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        super().close()


class PostgresStore(SqlStore):
    """Store in a PostgreSQL schema (the URL's ``search_path``), which several servers may share."""

    _INSERT_ORDER = "seq"
    _NO_LIMIT = None
    _CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"
    _LISTED_SQL = _LISTED_SQL

    def __init__(self, url: str, *, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        self.url = url
        self._failures = _Failures(url)
        self.display_url = self._failures.display_url
        self.schema = self._find_schema()
        self._registry_lock = advisory_key(self.schema, "store:registry")
        self._channel = _channel(self.schema)
        self._feed = NotifyFeed(url, channel=self._channel)
        self._locks = AdvisoryLocks(url, schema=self.schema)
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url,
            min_size=1,
            max_size=POOL_MAX_SIZE,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            open=False,
            name="appliance-store",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            self._migrate(migrations)
        except psycopg.Error as exc:
            self.close()
            raise self._failures(exc) from exc
        except BaseException:
            self.close()
            raise

    def _find_schema(self) -> str:
        """The schema the URL's connections create tables in; the first connection, so a wrong
        URL fails at once with libpq's own reason."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as connection:
                row = connection.execute("SELECT current_schema()").fetchone()
        except psycopg.Error as exc:
            raise self._failures(exc) from exc
        if row is None or row[0] is None:
            raise StoreFailure(
                f"the PostgreSQL database {self.display_url} has no schema to keep tables in:"
                " its search_path names none that exists",
                hint="create the schema, or name an existing one in the URL's options=-csearch_path=...",
            )
        return str(row[0])

    def close(self) -> None:
        self._feed.close()
        self._pool.close()

    def shared_locks(self) -> Locks | None:
        return self._locks

    def change_feed(self) -> ChangeFeed:
        self._feed.start()
        return self._feed

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A pooled connection inside one transaction: committed when the block ends, rolled back
        on an error. For ``appliance db`` (status, copy); everything else uses the Store methods."""
        try:
            with self._transaction() as connection:
                yield connection
        except psycopg.Error as exc:
            raise self._failures(exc) from exc

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A pooled connection inside a transaction it has begun. A pooled connection the server
        dropped meanwhile (it restarted, say) fails at BEGIN, before anything ran: then once more
        with another (the pool discards the dead one)."""
        for attempt in range(2):
            with ExitStack() as stack:
                connection = stack.enter_context(self._pool.connection())
                try:
                    stack.enter_context(connection.transaction())
                except psycopg.OperationalError:
                    if attempt == 0 and connection.closed:
                        continue
                    raise
                yield connection
                return

    @contextmanager
    def _write(self, *changes: Topic) -> Iterator[_Transaction]:
        try:
            with self._transaction() as connection, connection.cursor() as cursor:
                if "registry" in changes:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._registry_lock,))
                yield _Transaction(cursor)
                for topic in changes:  # delivered when the transaction commits, not before
                    cursor.execute("SELECT pg_notify(%s, %s)", (self._channel, topic))
        except psycopg.Error as exc:
            raise self._failures(exc) from exc
        if changes:
            self._feed.bump(*changes)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        statement = _statement(sql, params)
        try:
            with self._pool.connection() as connection:
                try:
                    return connection.execute(*statement).fetchall()
                except psycopg.OperationalError:
                    if not connection.closed:
                        raise
            # The server dropped that connection (it restarted, say): a read is safe to repeat.
            with self._pool.connection() as connection:
                return connection.execute(*statement).fetchall()
        except psycopg.Error as exc:
            raise self._failures(exc) from exc

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply missing migrations, each in its own transaction, one server at a time (an
        advisory lock held for each transaction); an up-to-date schema is only read."""
        lock = advisory_key(self.schema, "store:migrations")
        if not self._query(
            "SELECT 1 FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
        ):
            with self._write() as db:
                db.rows("SELECT pg_advisory_xact_lock(?)", (lock,))
                db.run(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
                    ' name TEXT COLLATE "C" NOT NULL UNIQUE, applied_at TEXT COLLATE "C" NOT NULL)'
                )
        applied = {row[0] for row in self._query("SELECT name FROM schema_migrations")}
        for migration in migrations:
            if migration.name in applied:
                continue
            with self._write() as db:
                db.rows("SELECT pg_advisory_xact_lock(?)", (lock,))
                # Another server may have applied it while we waited for the lock.
                if db.rows("SELECT 1 FROM schema_migrations WHERE name = ?", (migration.name,)):
                    continue
                db.run(migration.postgres)
                db.run(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, utcnow()),
                )
