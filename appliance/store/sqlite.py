"""The embedded store: SQLite through apsw.

WAL journal, foreign keys on, a busy timeout so several processes (the server and a CLI
command, say) share one file, and one writer: every write runs inside ``BEGIN IMMEDIATE``
behind a lock, while reads use a connection per thread.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, Unpack

import apsw

from appliance.errors import (
    ApiKeyNotFound,
    DiskFull,
    DownloadNotFound,
    DownloadNotPending,
    JoinTokenNotFound,
    LeaseLost,
    ModelExists,
    ModelNotFound,
    NodeExists,
    NodeNotFound,
    StoreFailure,
    TaskFinished,
    TaskNotFound,
    UserExists,
    UserNotFound,
)
from appliance.names import ModelName
from appliance.store.base import (
    LISTED_CAPABILITIES,
    ApiKey,
    Artifact,
    AuditEvent,
    Blob,
    BlobState,
    Download,
    DownloadChanges,
    DownloadState,
    InferenceRecord,
    JoinToken,
    LoginSession,
    Model,
    ModelSummary,
    NewArtifact,
    Node,
    NodeChanges,
    NodeModel,
    RemovedModel,
    Server,
    Task,
    TaskChanges,
    TaskMode,
    TaskState,
    User,
    UserRole,
    utcnow,
)
from appliance.store.feed import ChangeFeed, LocalFeed, Topic
from appliance.store.locks import Locks
from appliance.store.migrations import MIGRATIONS, Migration

__all__ = ["SqliteStore"]

BUSY_TIMEOUT_MS = 30_000
DISK_FULL_BYTES = 1024 * 1024  # below this much free space, an I/O error is the disk being full

_MODEL_COLUMNS = """
    m.name, v.id, v.version, v.capabilities, v.pinned, v.created_at, v.updated_at, v.last_used_at
"""

# One row per artifact of the page's model versions (with one and no artifact row for a version
# without any), in list order; Python sums them up. One json_extract reads only the listed
# capabilities, so nothing parses the rest (a chat template, say) into Python objects.
_LISTED_PATHS = ", ".join(f"'$.{key}'" for key in LISTED_CAPABILITIES)
_SUMMARY_SQL = f"""
    SELECT v.name, v.version, v.pinned, v.created_at, v.updated_at, v.listed,
           a.artifact_type, a.sha256, a.size_bytes, b.state
    FROM (
        SELECT m.name, v.id, v.version, v.pinned, v.created_at, v.updated_at,
               json_extract(v.capabilities, {_LISTED_PATHS}) AS listed
        FROM model_versions v JOIN models m ON m.id = v.model_id
        {{where}} ORDER BY m.name, v.version LIMIT ?
    ) v
    LEFT JOIN model_artifacts a ON a.model_version_id = v.id
    LEFT JOIN blobs b ON b.digest = a.sha256
    ORDER BY v.name, v.version, a.filename
"""


def _past(after: ModelName | None) -> tuple[str, list[Any]]:
    """The condition for the models past ``after`` in list order (name, then tag)."""
    if after is None:
        return "", []
    return "WHERE (m.name, v.version) > (?, ?)", [after.name, after.tag]


def _where(*, within: dict[str, Sequence[Any]], equal: dict[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause (or nothing) and its parameters: each column of ``within`` among its values
    (an empty sequence does not filter), each of ``equal`` equal to its value (None does not)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, values in within.items():
        if values:
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    for column, value in equal.items():
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


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


# In the order of Download's fields.
_DOWNLOAD_COLUMNS = (
    "id",
    "ref",
    "state",
    "requested_by",
    "model_name",
    "expected_digest",
    "digest",
    "bytes_done",
    "bytes_total",
    "rate_bytes_per_s",
    "error",
    "decided_by",
    "created_at",
    "updated_at",
    "error_code",
    "note",
)

# In the order of Task's fields; limits and result are JSON text.
_TASK_COLUMNS = (
    "id",
    "mode",
    "text",
    "model",
    "state",
    "actor",
    "limits",
    "attempts",
    "lease_owner",
    "lease_expires_at",
    "idempotency_key",
    "result",
    "created_at",
    "started_at",
    "finished_at",
)
_TASK_JSON_COLUMNS = ("limits", "result")


def _task(row: Sequence[Any]) -> Task:
    values = dict(zip(_TASK_COLUMNS, row, strict=True))
    for name in _TASK_JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Task(**values)


def _task_value(name: str, value: Any) -> Any:
    return json.dumps(value) if name in _TASK_JSON_COLUMNS and value is not None else value


_USER_COLUMNS = ("name", "role", "password_hash", "created_at", "updated_at")
_SESSION_COLUMNS = ("id_sha256", "user_name", "csrf_token", "address", "created_at", "expires_at")
# In the order of ApiKey's fields.
_KEY_COLUMNS = (
    "id",
    "name",
    "prefix",
    "secret_sha256",
    "role",
    "user_name",
    "created_by",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
)


# In the order of JoinToken's fields.
_JOIN_TOKEN_COLUMNS = ("id", "secret_hash", "created_by", "created_at", "expires_at", "revoked_at", "uses")
# In the order of Node's fields (models aside); the JSON ones are text.
_SERVER_COLUMNS = ("id", "url", "credential_hash", "version", "started_at", "last_seen_at", "ca_pem")
_NODE_COLUMNS = (
    "id",
    "name",
    "credential_hash",
    "config_version",
    "token_id",
    "joined_at",
    "drained",
    "last_heartbeat_at",
    "capabilities",
    "load",
    "config",
    "config_applied",
)
_NODE_JSON_COLUMNS = ("capabilities", "load", "config")
_NODE_MODEL_COLUMNS = ("digest", "model", "state", "reason", "updated_at")


def _node_value(name: str, value: Any) -> Any:
    if name in _NODE_JSON_COLUMNS:
        return json.dumps(value)
    return int(value) if name == "drained" else value


class SqliteStore:
    """Store on one SQLite file. Safe to share between threads and processes."""

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
    def _write(self, *changes: Topic) -> Iterator[apsw.Connection]:
        """One write transaction; once it commits, the ``changes`` topics' counters move."""
        with self._write_lock:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise _translate(exc, self.path) from exc
            try:
                yield self._writer
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

    def _query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self._reader().execute(sql, params))
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply missing migrations; an up-to-date file is only read (so it opens on a full disk)."""
        try:
            tables = self._query("SELECT name FROM sqlite_master WHERE type = 'table'")
            if ("schema_migrations",) not in tables:
                with self._write() as db:
                    db.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)"
                    )
            applied = {row[0] for row in self._query("SELECT name FROM schema_migrations")}
            for migration in migrations:
                if migration.name in applied:
                    continue
                with self._write() as db:
                    # Another process may have applied it while we waited for the write lock.
                    if list(db.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (migration.name,))):
                        continue
                    db.execute(migration.sqlite)
                    db.execute(
                        "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                        (migration.name, utcnow()),
                    )
        except apsw.Error as exc:
            raise _translate(exc, self.path) from exc

    def applied_migrations(self) -> list[str]:
        return [row[0] for row in self._query("SELECT name FROM schema_migrations ORDER BY id")]

    # -- models ------------------------------------------------------------------------------

    def _artifacts(self, version_ids: Sequence[str]) -> dict[str, list[Artifact]]:
        found: dict[str, list[Artifact]] = {version_id: [] for version_id in version_ids}
        if not version_ids:
            return found
        marks = ",".join("?" * len(version_ids))
        rows = self._query(
            f"""
            SELECT a.model_version_id, a.filename, a.artifact_type, a.sha256, a.size_bytes,
                   a.source_uri, a.created_at, b.state
            FROM model_artifacts a JOIN blobs b ON b.digest = a.sha256
            WHERE a.model_version_id IN ({marks})
            ORDER BY a.filename
            """,
            list(version_ids),
        )
        for version_id, filename, fmt, digest, size, source, created, state in rows:
            found[version_id].append(Artifact(filename, fmt, digest, size, source, created, state))
        return found

    def _models(
        self, where: str = "", params: Sequence[Any] = (), *, limit: int | None = None
    ) -> list[Model]:
        rows = self._query(
            f"SELECT {_MODEL_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id "
            f"{where} ORDER BY m.name, v.version LIMIT ?",
            [*params, -1 if limit is None else limit],
        )
        artifacts = self._artifacts([row[1] for row in rows])
        return [
            Model(
                name=ModelName(name, version),
                capabilities=json.loads(capabilities),
                pinned=bool(pinned),
                created_at=created,
                updated_at=updated,
                last_used_at=last_used,
                artifacts=tuple(artifacts[version_id]),
            )
            for name, version_id, version, capabilities, pinned, created, updated, last_used in rows
        ]

    def get_model(self, name: ModelName) -> Model | None:
        found = self._models("WHERE m.name = ? AND v.version = ?", (name.name, name.tag))
        return found[0] if found else None

    def _require_model(self, name: ModelName) -> Model:
        model = self.get_model(name)
        if model is None:
            raise ModelNotFound(f"model {name} not found")
        return model

    def list_models(self, *, after: ModelName | None = None, limit: int | None = None) -> list[Model]:
        where, params = _past(after)
        return self._models(where, params, limit=limit)

    def list_model_summaries(
        self, *, after: ModelName | None = None, limit: int | None = None, gguf_only: bool = False
    ) -> list[ModelSummary]:
        where, params = _past(after)
        if gguf_only:
            where = f"{where} {'AND' if where else 'WHERE'} EXISTS (SELECT 1 FROM model_artifacts g"
            where += " WHERE g.model_version_id = v.id AND g.artifact_type = 'gguf')"
        rows = self._query(_SUMMARY_SQL.format(where=where), [*params, -1 if limit is None else limit])
        summaries: list[ModelSummary] = []
        for (name, tag, pinned, created, updated, listed), artifacts in groupby(
            rows, key=itemgetter(*range(6))
        ):
            files = [(fmt, digest, size, state) for *_, fmt, digest, size, state in artifacts if digest]
            values = json.loads(listed)
            summaries.append(
                ModelSummary(
                    name=ModelName(name, tag),
                    capabilities={
                        key: value
                        for key, value in zip(LISTED_CAPABILITIES, values, strict=True)
                        if value is not None
                    },
                    pinned=bool(pinned),
                    created_at=created,
                    updated_at=updated,
                    size_bytes=sum(size for _, _, size, _ in files),
                    formats=tuple(sorted({fmt for fmt, _, _, _ in files})),
                    state="quarantined" if any(state == "quarantined" for *_, state in files) else "ok",
                    first_digest=files[0][1] if files else None,
                    gguf_digest=next((digest for fmt, digest, _, _ in files if fmt == "gguf"), None),
                )
            )
        return summaries

    def has_loadable_model(self) -> bool:
        rows = self._query(
            "SELECT 1 FROM model_artifacts g WHERE g.artifact_type = 'gguf' AND NOT EXISTS"
            " (SELECT 1 FROM model_artifacts a JOIN blobs b ON b.digest = a.sha256"
            "  WHERE a.model_version_id = g.model_version_id AND b.state = 'quarantined') LIMIT 1"
        )
        return bool(rows)

    def registry_generation(self) -> int:
        ((generation,),) = self._query("SELECT generation FROM registry_generation")
        return int(generation)

    def add_artifact(
        self,
        name: ModelName,
        artifact: NewArtifact,
        *,
        capabilities: dict[str, Any],
        actor: str,
        replacing: Sequence[str] = (),
        sole_format: bool = False,
    ) -> tuple[Model, bool]:
        with self._write("registry") as db:
            added = self._add_artifact(
                db,
                name,
                artifact,
                capabilities=capabilities,
                actor=actor,
                replacing=replacing,
                sole_format=sole_format,
            )
        return self._require_model(name), added

    def add_artifacts(
        self,
        name: ModelName,
        artifacts: Sequence[NewArtifact],
        *,
        capabilities: dict[str, Any],
        actor: str,
        sole_formats: Collection[str] = (),
    ) -> tuple[Model, bool]:
        added = False
        with self._write("registry") as db:
            for artifact in artifacts:
                added |= self._add_artifact(
                    db,
                    name,
                    artifact,
                    capabilities=capabilities,
                    actor=actor,
                    replacing=(),
                    sole_format=artifact.format in sole_formats,
                )
        return self._require_model(name), added

    def _add_artifact(
        self,
        db: apsw.Connection,
        name: ModelName,
        artifact: NewArtifact,
        *,
        capabilities: dict[str, Any],
        actor: str,
        replacing: Sequence[str],
        sole_format: bool,
    ) -> bool:
        """One artifact's rows, inside the caller's write transaction; whether anything was added."""
        now = utcnow()
        added = False
        db.execute(
            "INSERT INTO blobs (digest, size_bytes, state, created_at, last_verified_at, link_stat)"
            " VALUES (?, ?, 'ok', ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
            " link_stat = excluded.link_stat WHERE excluded.link_stat IS NOT NULL",
            (artifact.digest, artifact.size_bytes, now, now, artifact.link_stat),
        )
        db.execute(
            "INSERT OR IGNORE INTO models (id, name, vendor, created_at, updated_at, updated_by)"
            " VALUES (?, ?, '', ?, ?, ?)",
            (uuid.uuid4().hex, name.name, now, now, actor),
        )
        (model_id,) = next(db.execute("SELECT id FROM models WHERE name = ? AND vendor = ''", (name.name,)))
        version_rows = list(
            db.execute(
                "SELECT id, capabilities FROM model_versions WHERE model_id = ? AND version = ?",
                (model_id, name.tag),
            )
        )
        if version_rows:
            version_id, stored = version_rows[0]
            merged = {**json.loads(stored), **capabilities}
        else:
            version_id, merged = uuid.uuid4().hex, capabilities
            db.execute(
                "INSERT INTO model_versions (id, model_id, version, capabilities, last_used_at,"
                " created_at, updated_at) VALUES (?, ?, ?, '{}', ?, ?, ?)",
                (version_id, model_id, name.tag, now, now, now),
            )
        for filename in replacing:
            db.execute(
                "DELETE FROM model_artifacts WHERE model_version_id = ? AND filename = ?",
                (version_id, filename),
            )
        existing = list(
            db.execute(
                "SELECT sha256 FROM model_artifacts WHERE model_version_id = ? AND filename = ?",
                (version_id, artifact.filename),
            )
        )
        if existing and existing[0][0] != artifact.digest:
            raise ModelExists(
                f"model {name} already has a file {artifact.filename!r} with digest {existing[0][0]}"
            )
        other = sole_format and list(
            db.execute(
                "SELECT filename FROM model_artifacts WHERE model_version_id = ? AND artifact_type = ?"
                " AND sha256 != ? LIMIT 1",
                (version_id, artifact.format, artifact.digest),
            )
        )
        if other:
            raise ModelExists(
                f"model {name} already has a {artifact.format} file, {other[0][0]!r};"
                f" a model holds one {artifact.format} file"
            )
        if not existing:
            added = True
            db.execute(
                "INSERT INTO model_artifacts (id, model_version_id, artifact_type, filename, sha256,"
                " size_bytes, source_uri, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uuid.uuid4().hex,
                    version_id,
                    artifact.format,
                    artifact.filename,
                    artifact.digest,
                    artifact.size_bytes,
                    artifact.source_uri,
                    now,
                ),
            )
            db.execute(
                "UPDATE model_versions SET capabilities = ?, updated_at = ?, last_used_at = ? WHERE id = ?",
                (json.dumps(merged, sort_keys=True), now, now, version_id),
            )
            db.execute(
                "UPDATE models SET updated_at = ?, updated_by = ? WHERE id = ?", (now, actor, model_id)
            )
        return added

    def remove_model(self, name: ModelName) -> RemovedModel:
        model = self._require_model(name)
        with self._write("registry") as db:
            rows = list(
                db.execute(
                    "SELECT v.id, v.model_id FROM model_versions v JOIN models m ON m.id = v.model_id"
                    " WHERE m.name = ? AND v.version = ?",
                    (name.name, name.tag),
                )
            )
            if not rows:
                raise ModelNotFound(f"model {name} not found")
            version_id, model_id = rows[0]
            digests = [
                row[0]
                for row in db.execute(
                    "SELECT DISTINCT sha256 FROM model_artifacts WHERE model_version_id = ?", (version_id,)
                )
            ]
            db.execute("DELETE FROM model_versions WHERE id = ?", (version_id,))
            db.execute(
                "DELETE FROM models WHERE id = ? AND NOT EXISTS"
                " (SELECT 1 FROM model_versions WHERE model_id = ?)",
                (model_id, model_id),
            )
            orphaned: list[str] = []
            freed = 0
            for digest in digests:
                if not list(db.execute("SELECT 1 FROM model_artifacts WHERE sha256 = ? LIMIT 1", (digest,))):
                    (size,) = next(db.execute("SELECT size_bytes FROM blobs WHERE digest = ?", (digest,)))
                    orphaned.append(digest)
                    freed += size
        return RemovedModel(model=model, orphaned_digests=tuple(orphaned), freed_bytes=freed)

    def set_pinned(self, name: ModelName, pinned: bool) -> Model:
        self._require_model(name)
        with self._write("registry") as db:
            db.execute(
                "UPDATE model_versions SET pinned = ?, updated_at = ? WHERE version = ? AND model_id ="
                " (SELECT id FROM models WHERE name = ? AND vendor = '')",
                (int(pinned), utcnow(), name.tag, name.name),
            )
        return self._require_model(name)

    def touch_model(self, name: ModelName) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE model_versions SET last_used_at = ? WHERE version = ? AND model_id ="
                " (SELECT id FROM models WHERE name = ? AND vendor = '')",
                (utcnow(), name.tag, name.name),
            )

    # -- blobs -------------------------------------------------------------------------------

    def _blobs(self, where: str = "", params: Sequence[Any] = ()) -> list[Blob]:
        rows = self._query(
            "SELECT digest, size_bytes, state, created_at, last_verified_at, link_stat"
            f" FROM blobs {where} ORDER BY digest",
            params,
        )
        return [Blob(*row) for row in rows]

    def get_blob(self, digest: str) -> Blob | None:
        found = self._blobs("WHERE digest = ?", (digest,))
        return found[0] if found else None

    def list_blobs(self) -> list[Blob]:
        return self._blobs()

    def cache_bytes(self) -> int:
        ((total,),) = self._query("SELECT COALESCE(SUM(size_bytes), 0) FROM blobs")
        return int(total)

    def mark_verified(self, digest: str, *, state: BlobState, link_stat: str | None = None) -> None:
        with self._write("registry") as db:
            db.execute(
                "UPDATE blobs SET state = ?, last_verified_at = ?, link_stat = COALESCE(?, link_stat)"
                " WHERE digest = ?",
                (state, utcnow(), link_stat, digest),
            )

    def forget_blobs(self, digests: Sequence[str]) -> None:
        with self._write("registry") as db:
            for digest in digests:
                db.execute(
                    "DELETE FROM blobs WHERE digest = ? AND NOT EXISTS"
                    " (SELECT 1 FROM model_artifacts WHERE sha256 = ?)",
                    (digest, digest),
                )

    # -- audit -------------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> AuditEvent:
        with self._write() as db:
            db.execute(
                "INSERT INTO audit_log (at, actor, action, target, outcome, bytes, duration_ms,"
                " correlation_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.at,
                    event.actor,
                    event.action,
                    event.target,
                    event.outcome,
                    event.bytes,
                    event.duration_ms,
                    event.correlation_id,
                    json.dumps(event.detail, sort_keys=True, default=str),
                ),
            )
            event_id = db.last_insert_rowid()
        return AuditEvent(**{**event.__dict__, "id": event_id})

    def list_audit(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
    ) -> list[AuditEvent]:
        clauses: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("action = ?", action),
            ("actor = ?", actor),
            ("at >= ?", since),
            ("at < ?", until),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(
            "SELECT id, at, actor, action, target, outcome, bytes, duration_ms, correlation_id, detail"
            f" FROM audit_log {where} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [
            AuditEvent(
                id=row[0],
                at=row[1],
                actor=row[2],
                action=row[3],
                target=row[4],
                outcome=row[5],
                bytes=row[6],
                duration_ms=row[7],
                correlation_id=row[8],
                detail=json.loads(row[9]),
            )
            for row in rows
        ]

    # -- downloads ---------------------------------------------------------------------------

    def create_download(self, download: Download) -> Download:
        row = {name: getattr(download, name) for name in _DOWNLOAD_COLUMNS}
        with self._write("downloads") as db:
            db.execute(
                f"INSERT INTO downloads ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return download

    def update_download(
        self,
        download_id: str,
        *,
        only_from: Sequence[DownloadState] = (),
        **changes: Unpack[DownloadChanges],
    ) -> Download:
        # The names become SQL: refuse any a caller outside the type checker's sight made up.
        unknown = set(changes) - DownloadChanges.__optional_keys__
        if unknown:
            raise ValueError(f"not a download column: {sorted(unknown)}")
        columns: dict[str, object] = {**changes, "updated_at": utcnow()}
        condition = f" AND state IN ({', '.join('?' * len(only_from))})" if only_from else ""
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self._write("downloads") as db:
            db.execute(
                f"UPDATE downloads SET {assignments} WHERE id = ?{condition}",
                [*columns.values(), download_id, *only_from],
            )
            changed = db.changes()
        found = self.get_download(download_id)
        if found is None:
            raise DownloadNotFound(f"download {download_id} not found")
        if changed == 0:
            raise DownloadNotPending(f"download {download_id} is {found.state}, not {' or '.join(only_from)}")
        return found

    def get_download(self, download_id: str) -> Download | None:
        rows = self._query(
            f"SELECT {', '.join(_DOWNLOAD_COLUMNS)} FROM downloads WHERE id = ?", (download_id,)
        )
        return Download(*rows[0]) if rows else None

    def list_downloads(
        self, *, states: Sequence[str] = (), ref: str | None = None, limit: int = 100
    ) -> list[Download]:
        where, params = _where(within={"state": states}, equal={"ref": ref})
        rows = self._query(
            f"SELECT {', '.join(_DOWNLOAD_COLUMNS)} FROM downloads {where}"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [*params, limit],
        )
        return [Download(*row) for row in rows]

    def find_artifact_by_source(self, source_uri: str) -> tuple[Model, Artifact] | None:
        rows = self._query(
            "SELECT v.id FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id"
            " WHERE a.source_uri = ? OR substr(a.source_uri, 1, ?) = ?"
            " ORDER BY a.created_at DESC LIMIT 1",
            (source_uri, len(source_uri) + 1, f"{source_uri}#"),
        )
        if not rows:
            return None
        (model,) = self._models("WHERE v.id = ?", (rows[0][0],))
        artifact = next(a for a in model.artifacts if (a.source_uri or "").split("#")[0] == source_uri)
        return model, artifact

    # -- tasks -------------------------------------------------------------------------------

    def create_task(self, task: Task) -> tuple[Task, bool]:
        row = {name: _task_value(name, getattr(task, name)) for name in _TASK_COLUMNS}
        with self._write("tasks") as db:
            if task.idempotency_key is not None:
                found = list(
                    db.execute(
                        f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks"
                        " WHERE actor = ? AND idempotency_key = ?",
                        (task.actor, task.idempotency_key),
                    )
                )
                if found:
                    return _task(found[0]), False
            db.execute(
                f"INSERT INTO tasks ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return task, True

    def get_task(self, task_id: str) -> Task | None:
        rows = self._query(f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE id = ?", (task_id,))
        return _task(rows[0]) if rows else None

    def list_tasks(
        self, *, states: Sequence[TaskState] = (), actor: str | None = None, limit: int = 100
    ) -> list[Task]:
        where, params = _where(within={"state": states}, equal={"actor": actor})
        rows = self._query(
            f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks {where}"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [*params, limit],
        )
        return [_task(row) for row in rows]

    def update_task(
        self,
        task_id: str,
        *,
        only_from: Sequence[TaskState] = (),
        only_owner: str | None = None,
        only_attempt: int | None = None,
        **changes: Unpack[TaskChanges],
    ) -> Task:
        # The names become SQL: refuse any a caller outside the type checker's sight made up.
        unknown = set(changes) - TaskChanges.__optional_keys__
        if unknown:
            raise ValueError(f"not a task column: {sorted(unknown)}")
        if not changes:
            raise ValueError("update_task needs a column to set")
        condition = f" AND state IN ({', '.join('?' * len(only_from))})" if only_from else ""
        owner = [] if only_owner is None else [only_owner]
        condition += " AND lease_owner = ?" if owner else ""
        attempt = [] if only_attempt is None else [only_attempt]
        condition += " AND attempts = ?" if attempt else ""
        assignments = ", ".join(f"{name} = ?" for name in changes)
        values = [_task_value(name, value) for name, value in changes.items()]
        with self._write("tasks") as db:
            db.execute(
                f"UPDATE tasks SET {assignments} WHERE id = ?{condition}",
                [*values, task_id, *only_from, *owner, *attempt],
            )
            changed = db.changes()
        found = self.get_task(task_id)
        if found is None:
            raise TaskNotFound(f"task {task_id} not found")
        if changed == 0:
            if only_from and found.state not in only_from:
                raise TaskFinished(f"task {task_id} is {found.state}, not {' or '.join(only_from)}")
            if only_attempt is not None and found.attempts != only_attempt:
                raise LeaseLost(f"task {task_id} is on attempt {found.attempts}, not {only_attempt}")
            raise LeaseLost(f"task {task_id} is leased to {found.lease_owner or 'no one'}, not {only_owner}")
        return found

    def claim_task(self, *, owner: str, lease_expires_at: str, modes: Sequence[TaskMode] = ()) -> Task | None:
        where, params = _where(within={"state": ("queued",), "mode": modes}, equal={})
        # Read first: an idle queue asks often, and a read takes no write lock.
        if not self._query(f"SELECT 1 FROM tasks {where} LIMIT 1", params):
            return None
        with self._write("tasks") as db:
            rows = list(
                db.execute(f"SELECT id FROM tasks {where} ORDER BY created_at, rowid LIMIT 1", params)
            )
            if not rows:
                return None
            db.execute(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, lease_owner = ?,"
                " lease_expires_at = ?, started_at = ?, finished_at = NULL, result = NULL WHERE id = ?",
                (owner, lease_expires_at, utcnow(), rows[0][0]),
            )
            found = list(
                db.execute(f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE id = ?", (rows[0][0],))
            )
        return _task(found[0])

    # -- inference -------------------------------------------------------------------------------

    def append_inference(self, record: InferenceRecord) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO inference_requests (at, model, endpoint, engine, node, reason, outcome,"
                " prompt_tokens, completion_tokens, duration_ms, correlation_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.at,
                    record.model,
                    record.endpoint,
                    record.engine,
                    record.node,
                    record.reason,
                    record.outcome,
                    record.prompt_tokens,
                    record.completion_tokens,
                    record.duration_ms,
                    record.correlation_id,
                ),
            )

    def list_inference(self, *, model: str | None = None, limit: int = 100) -> list[InferenceRecord]:
        where, params = ("WHERE model = ?", [model]) if model is not None else ("", [])
        rows = self._query(
            "SELECT model, endpoint, engine, node, reason, outcome, prompt_tokens, completion_tokens,"
            f" duration_ms, correlation_id, at, id FROM inference_requests {where} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [InferenceRecord(*row) for row in rows]

    # -- preferences -------------------------------------------------------------------------

    def get_preference(self, key: str) -> Any | None:
        rows = self._query("SELECT value FROM preferences WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def set_preference(self, key: str, value: Any, *, actor: str) -> None:
        with self._write("preferences") as db:
            if value is None:
                db.execute("DELETE FROM preferences WHERE key = ?", (key,))
                return
            db.execute(
                "INSERT INTO preferences (key, value, updated_at, updated_by) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                (key, json.dumps(value), utcnow(), actor),
            )

    def list_preferences(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._query("SELECT key, value FROM preferences")}

    # -- users and API keys ------------------------------------------------------------------

    def create_user(self, user: User) -> User:
        row = {name: getattr(user, name) for name in _USER_COLUMNS}
        with self._write() as db:
            if list(db.execute("SELECT 1 FROM users WHERE name = ?", (user.name,))):
                raise UserExists(f"user {user.name!r} already exists")
            db.execute(
                f"INSERT INTO users ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return user

    def get_user(self, name: str) -> User | None:
        rows = self._query(f"SELECT {', '.join(_USER_COLUMNS)} FROM users WHERE name = ?", (name,))
        return User(*rows[0]) if rows else None

    def list_users(self) -> list[User]:
        return [
            User(*row) for row in self._query(f"SELECT {', '.join(_USER_COLUMNS)} FROM users ORDER BY name")
        ]

    def update_user(
        self, name: str, *, role: UserRole | None = None, password_hash: str | None = None
    ) -> User:
        columns: dict[str, object] = {"updated_at": utcnow()}
        if role is not None:
            columns["role"] = role
        if password_hash is not None:
            columns["password_hash"] = password_hash
        with self._write() as db:
            db.execute(
                f"UPDATE users SET {', '.join(f'{column} = ?' for column in columns)} WHERE name = ?",
                [*columns.values(), name],
            )
            changed = db.changes()
        user = self.get_user(name)
        if not changed or user is None:
            raise UserNotFound(f"no user {name!r}")
        return user

    def remove_user(self, name: str) -> User:
        user = self.get_user(name)
        with self._write() as db:
            db.execute("DELETE FROM users WHERE name = ?", (name,))
            if user is None or not db.changes():
                raise UserNotFound(f"no user {name!r}")
        return user

    def create_api_key(self, key: ApiKey) -> ApiKey:
        row = {name: getattr(key, name) for name in _KEY_COLUMNS}
        with self._write() as db:
            if key.user_name is not None and not list(
                db.execute("SELECT 1 FROM users WHERE name = ?", (key.user_name,))
            ):
                raise UserNotFound(f"no user {key.user_name!r}")
            db.execute(
                f"INSERT INTO api_keys ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return key

    def _keys(self, where: str, params: Sequence[Any] = ()) -> list[ApiKey]:
        rows = self._query(f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys {where}", params)
        return [ApiKey(*row) for row in rows]

    def get_api_key(self, key_id: str) -> ApiKey | None:
        found = self._keys("WHERE id = ?", (key_id,))
        return found[0] if found else None

    def find_api_key(self, secret_sha256: str) -> ApiKey | None:
        found = self._keys("WHERE secret_sha256 = ?", (secret_sha256,))
        return found[0] if found else None

    def list_api_keys(self, *, user_name: str | None = None) -> list[ApiKey]:
        if user_name is None:
            return self._keys("ORDER BY created_at, rowid")
        return self._keys("WHERE user_name = ? ORDER BY created_at, rowid", (user_name,))

    def revoke_api_key(self, key_id: str) -> ApiKey:
        with self._write() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (utcnow(), key_id)
            )
            changed = db.changes()
        key = self.get_api_key(key_id)
        if not changed or key is None:
            raise ApiKeyNotFound(f"no API key {key_id!r}")
        return key

    def touch_api_key(self, key_id: str, at: str) -> None:
        with self._write() as db:
            db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (at, key_id))

    # -- browser logins ------------------------------------------------------------------------

    def create_login_session(self, session: LoginSession) -> LoginSession:
        row = {name: getattr(session, name) for name in _SESSION_COLUMNS}
        with self._write() as db:
            if not list(db.execute("SELECT 1 FROM users WHERE name = ?", (session.user_name,))):
                raise UserNotFound(f"no user {session.user_name!r}")
            db.execute("DELETE FROM login_sessions WHERE expires_at < ?", (session.created_at,))
            db.execute(
                f"INSERT INTO login_sessions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return session

    def get_login_session(self, id_sha256: str) -> LoginSession | None:
        columns = ", ".join(_SESSION_COLUMNS)
        rows = self._query(f"SELECT {columns} FROM login_sessions WHERE id_sha256 = ?", (id_sha256,))
        return LoginSession(*rows[0]) if rows else None

    def delete_login_session(self, id_sha256: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM login_sessions WHERE id_sha256 = ?", (id_sha256,))
            return bool(db.changes())

    def delete_login_sessions(self, user_name: str) -> int:
        with self._write() as db:
            db.execute("DELETE FROM login_sessions WHERE user_name = ?", (user_name,))
            return int(db.changes())

    # -- cluster -----------------------------------------------------------------------------

    def create_join_token(self, token: JoinToken) -> JoinToken:
        row = {name: getattr(token, name) for name in _JOIN_TOKEN_COLUMNS}
        with self._write() as db:
            db.execute(
                f"INSERT INTO join_tokens ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return token

    def _join_tokens(self, where: str, params: Sequence[Any] = ()) -> list[JoinToken]:
        rows = self._query(f"SELECT {', '.join(_JOIN_TOKEN_COLUMNS)} FROM join_tokens {where}", params)
        return [JoinToken(*row) for row in rows]

    def get_join_token(self, token_id: str) -> JoinToken | None:
        found = self._join_tokens("WHERE id = ?", (token_id,))
        return found[0] if found else None

    def list_join_tokens(self) -> list[JoinToken]:
        return self._join_tokens("ORDER BY created_at, rowid")

    def revoke_join_token(self, token_id: str) -> JoinToken:
        with self._write() as db:
            db.execute(
                "UPDATE join_tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (utcnow(), token_id),
            )
            changed = db.changes()
        token = self.get_join_token(token_id)
        if not changed or token is None:
            raise JoinTokenNotFound(f"no join token {token_id!r}")
        return token

    def create_node(self, node: Node) -> Node:
        row = {name: _node_value(name, getattr(node, name)) for name in _NODE_COLUMNS}
        with self._write() as db:
            if list(db.execute("SELECT 1 FROM nodes WHERE name = ?", (node.name,))):
                raise NodeExists(f"a node named {node.name!r} has already joined")
            db.execute(
                f"INSERT INTO nodes ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            if node.token_id is not None:
                db.execute("UPDATE join_tokens SET uses = uses + 1 WHERE id = ?", (node.token_id,))
        return node

    def _nodes(self, where: str, params: Sequence[Any] = ()) -> list[Node]:
        rows = self._query(f"SELECT {', '.join(_NODE_COLUMNS)} FROM nodes {where}", params)
        if not rows:
            return []
        ids = [row[0] for row in rows]
        held: dict[str, list[NodeModel]] = {node_id: [] for node_id in ids}
        for node_id, *fields in self._query(
            f"SELECT node_id, {', '.join(_NODE_MODEL_COLUMNS)} FROM node_model_availability"
            f" WHERE node_id IN ({', '.join('?' * len(ids))}) ORDER BY model, digest",
            ids,
        ):
            held[node_id].append(NodeModel(*fields))
        nodes = []
        for row in rows:
            values = dict(zip(_NODE_COLUMNS, row, strict=True))
            for name in _NODE_JSON_COLUMNS:
                values[name] = json.loads(values[name])
            values["drained"] = bool(values["drained"])
            nodes.append(Node(**values, models=tuple(held[values["id"]])))
        return nodes

    def get_node(self, id_or_name: str) -> Node | None:
        found = self._nodes("WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1", (id_or_name,) * 3)
        return found[0] if found else None

    def find_node(self, credential_hash: str) -> Node | None:
        found = self._nodes("WHERE credential_hash = ?", (credential_hash,))
        return found[0] if found else None

    def list_nodes(self) -> list[Node]:
        return self._nodes("ORDER BY name")

    def update_node(
        self, node_id: str, *, models: Sequence[NodeModel] | None = None, **changes: Unpack[NodeChanges]
    ) -> Node:
        # The names become SQL: refuse any a caller outside the type checker's sight made up.
        unknown = set(changes) - NodeChanges.__optional_keys__
        if unknown:
            raise ValueError(f"not a node column: {sorted(unknown)}")
        with self._write() as db:
            if not list(db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,))):
                raise NodeNotFound(f"no node {node_id!r}")
            if changes:
                assignments = ", ".join(f"{name} = ?" for name in changes)
                values = [_node_value(name, value) for name, value in changes.items()]
                db.execute(f"UPDATE nodes SET {assignments} WHERE id = ?", [*values, node_id])
            if models is not None:
                db.execute("DELETE FROM node_model_availability WHERE node_id = ?", (node_id,))
                columns = ", ".join(_NODE_MODEL_COLUMNS)
                db.executemany(
                    f"INSERT OR REPLACE INTO node_model_availability (node_id, {columns})"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(node_id, m.digest, m.model, m.state, m.reason, m.updated_at) for m in models],
                )
        found = self.get_node(node_id)
        if found is None:  # removed between the write and this read
            raise NodeNotFound(f"no node {node_id!r}")
        return found

    def remove_node(self, node_id: str) -> Node:
        node = self.get_node(node_id)
        with self._write() as db:
            db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
            if node is None or not db.changes():
                raise NodeNotFound(f"no node {node_id!r}")
        return node

    # -- servers sharing this store ----------------------------------------------------------------

    def register_server(self, server: Server) -> Server:
        row = {name: getattr(server, name) for name in _SERVER_COLUMNS}
        updates = ", ".join(f"{name} = excluded.{name}" for name in _SERVER_COLUMNS[1:])
        with self._write() as db:
            db.execute(
                f"INSERT INTO servers ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
                f" ON CONFLICT (id) DO UPDATE SET {updates}",
                list(row.values()),
            )
        return server

    def touch_server(self, server_id: str, at: str) -> bool:
        with self._write() as db:
            db.execute("UPDATE servers SET last_seen_at = ? WHERE id = ?", (at, server_id))
            return bool(db.changes())

    def _servers(self, where: str, params: Sequence[Any] = ()) -> list[Server]:
        rows = self._query(f"SELECT {', '.join(_SERVER_COLUMNS)} FROM servers {where}", params)
        return [Server(*row) for row in rows]

    def find_server(self, credential_hash: str) -> Server | None:
        found = self._servers("WHERE credential_hash = ?", (credential_hash,))
        return found[0] if found else None

    def list_servers(self) -> list[Server]:
        return self._servers("ORDER BY started_at, id")
