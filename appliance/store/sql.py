"""The Store protocol in SQL both backends run: ``SqlStore``, whose subclasses (``SqliteStore``,
``PostgresStore``) only connect, run transactions, migrate and name a few dialect differences.

Statements are written with ``?`` placeholders and portable SQL (``ON CONFLICT``, ``RETURNING``,
row values). What differs is a class attribute: the column that orders rows written in the same
instant (SQLite's ``rowid``, PostgreSQL's ``seq``), how a query asks for no limit, how a claim
skips rows another transaction holds, and how JSON capabilities are read.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from itertools import groupby
from operator import itemgetter
from typing import Any, ClassVar, Protocol, Unpack

from appliance.errors import (
    ApiKeyNotFound,
    DownloadNotFound,
    DownloadNotPending,
    JoinTokenNotFound,
    LeaseLost,
    ModelExists,
    ModelNotFound,
    NodeExists,
    NodeNotFound,
    ProviderExists,
    ProviderNotFound,
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
    Provider,
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
from appliance.store.feed import Topic

__all__ = ["SqlStore", "Transaction"]


class Transaction(Protocol):
    """One open write transaction, as the shared SQL uses it."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; the rows it returned."""
        ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        ...

    def run_many(self, sql: str, params: Iterable[Sequence[Any]]) -> None: ...


_MODEL_COLUMNS = """
    m.name, v.id, v.version, v.capabilities, v.pinned, v.created_at, v.updated_at, v.last_used_at
"""

# One row per artifact of the page's model versions (with one and no artifact row for a version
# without any), in list order; Python sums them up. Only the listed capabilities are read (as a
# JSON array), so nothing parses the rest (a chat template, say) into Python objects.
_SUMMARY_SQL = """
    SELECT v.name, v.version, v.pinned, v.created_at, v.updated_at, v.listed,
           a.artifact_type, a.sha256, a.size_bytes, b.state
    FROM (
        SELECT m.name, v.id, v.version, v.pinned, v.created_at, v.updated_at, {listed} AS listed
        FROM model_versions v JOIN models m ON m.id = v.model_id
        {where} ORDER BY m.name, v.version LIMIT ?
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


def _insert(table: str, row: dict[str, Any], suffix: str = "") -> tuple[str, list[Any]]:
    return (
        f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}){suffix}",
        list(row.values()),
    )


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
    "attachments_on",
    "ran_on",
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


# In the order of Server's fields.
_SERVER_COLUMNS = ("id", "url", "credential_hash", "version", "started_at", "last_seen_at", "ca_pem")

# In the order of Provider's fields (key_set is read from provider_credentials).
_PROVIDER_COLUMNS = (
    "name",
    "kind",
    "base_url",
    "models",
    "operations",
    "subjects",
    "created_at",
    "updated_at",
)
_PROVIDER_JSON_COLUMNS = ("models", "operations", "subjects")
_PROVIDER_SELECT = (
    "SELECT p.name, p.kind, p.base_url, p.models, p.operations, p.subjects, p.created_at, p.updated_at,"
    " c.provider IS NOT NULL FROM providers p LEFT JOIN provider_credentials c ON c.provider = p.name"
)


def _provider_row(provider: Provider) -> dict[str, Any]:
    row = {name: getattr(provider, name) for name in _PROVIDER_COLUMNS}
    return {
        name: json.dumps(list(value)) if name in _PROVIDER_JSON_COLUMNS else value
        for name, value in row.items()
    }


def _provider(row: Sequence[Any]) -> Provider:
    name, kind, base_url, models, operations, subjects, created_at, updated_at, key_set = row
    return Provider(
        name=name,
        kind=kind,
        base_url=base_url,
        models=tuple(json.loads(models)),
        operations=tuple(json.loads(operations)),
        subjects=tuple(json.loads(subjects)),
        key_set=bool(key_set),
        created_at=created_at,
        updated_at=updated_at,
    )


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


class SqlStore(ABC):
    """Every Store method but those that connect, close and migrate, in SQL both dialects run."""

    # Orders rows created in the same instant by when they were inserted.
    _INSERT_ORDER: ClassVar[str]
    # The LIMIT parameter that means none.
    _NO_LIMIT: ClassVar[int | None]
    # What ends the claim's SELECT: in a database several writers share, it skips rows another holds.
    _CLAIM_LOCK: ClassVar[str] = ""
    # The LISTED_CAPABILITIES of ``v.capabilities`` (JSON text), as JSON array text.
    _LISTED_SQL: ClassVar[str]

    @abstractmethod
    def _write(self, *changes: Topic) -> AbstractContextManager[Transaction]:
        """One write transaction; once it commits, the ``changes`` topics' counters move."""

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read's rows."""

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
            [*params, self._NO_LIMIT if limit is None else limit],
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
        rows = self._query(
            _SUMMARY_SQL.format(listed=self._LISTED_SQL, where=where),
            [*params, self._NO_LIMIT if limit is None else limit],
        )
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
        db: Transaction,
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
        db.run(
            "INSERT INTO blobs (digest, size_bytes, state, created_at, last_verified_at, link_stat)"
            " VALUES (?, ?, 'ok', ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
            " link_stat = excluded.link_stat WHERE excluded.link_stat IS NOT NULL",
            (artifact.digest, artifact.size_bytes, now, now, artifact.link_stat),
        )
        # Insert unless present, then read: another writer may have added the model meanwhile.
        db.run(
            "INSERT INTO models (id, name, vendor, created_at, updated_at, updated_by)"
            " VALUES (?, ?, '', ?, ?, ?) ON CONFLICT (name, vendor) DO NOTHING",
            (uuid.uuid4().hex, name.name, now, now, actor),
        )
        ((model_id,),) = db.rows("SELECT id FROM models WHERE name = ? AND vendor = ''", (name.name,))
        db.run(
            "INSERT INTO model_versions (id, model_id, version, capabilities, last_used_at,"
            " created_at, updated_at) VALUES (?, ?, ?, '{}', ?, ?, ?)"
            " ON CONFLICT (model_id, version) DO NOTHING",
            (uuid.uuid4().hex, model_id, name.tag, now, now, now),
        )
        ((version_id, stored),) = db.rows(
            "SELECT id, capabilities FROM model_versions WHERE model_id = ? AND version = ?",
            (model_id, name.tag),
        )
        for filename in replacing:
            db.run(
                "DELETE FROM model_artifacts WHERE model_version_id = ? AND filename = ?",
                (version_id, filename),
            )
        existing = db.rows(
            "SELECT sha256 FROM model_artifacts WHERE model_version_id = ? AND filename = ?",
            (version_id, artifact.filename),
        )
        if existing and existing[0][0] != artifact.digest:
            raise ModelExists(
                f"model {name} already has a file {artifact.filename!r} with digest {existing[0][0]}"
            )
        other = sole_format and db.rows(
            "SELECT filename FROM model_artifacts WHERE model_version_id = ? AND artifact_type = ?"
            " AND sha256 != ? LIMIT 1",
            (version_id, artifact.format, artifact.digest),
        )
        if other:
            raise ModelExists(
                f"model {name} already has a {artifact.format} file, {other[0][0]!r};"
                f" a model holds one {artifact.format} file"
            )
        if existing:
            return False
        db.run(
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
        db.run(
            "UPDATE model_versions SET capabilities = ?, updated_at = ?, last_used_at = ? WHERE id = ?",
            (json.dumps({**json.loads(stored), **capabilities}, sort_keys=True), now, now, version_id),
        )
        db.run("UPDATE models SET updated_at = ?, updated_by = ? WHERE id = ?", (now, actor, model_id))
        return True

    def remove_model(self, name: ModelName) -> RemovedModel:
        model = self._require_model(name)
        with self._write("registry") as db:
            rows = db.rows(
                "SELECT v.id, v.model_id FROM model_versions v JOIN models m ON m.id = v.model_id"
                " WHERE m.name = ? AND v.version = ?",
                (name.name, name.tag),
            )
            if not rows:
                raise ModelNotFound(f"model {name} not found")
            version_id, model_id = rows[0]
            digests = [
                row[0]
                for row in db.rows(
                    "SELECT DISTINCT sha256 FROM model_artifacts WHERE model_version_id = ?", (version_id,)
                )
            ]
            db.run("DELETE FROM model_versions WHERE id = ?", (version_id,))
            db.run(
                "DELETE FROM models WHERE id = ? AND NOT EXISTS"
                " (SELECT 1 FROM model_versions WHERE model_id = ?)",
                (model_id, model_id),
            )
            orphaned: list[str] = []
            freed = 0
            for digest in digests:
                if not db.rows("SELECT 1 FROM model_artifacts WHERE sha256 = ? LIMIT 1", (digest,)):
                    ((size,),) = db.rows("SELECT size_bytes FROM blobs WHERE digest = ?", (digest,))
                    orphaned.append(digest)
                    freed += size
        return RemovedModel(model=model, orphaned_digests=tuple(orphaned), freed_bytes=freed)

    def set_pinned(self, name: ModelName, pinned: bool) -> Model:
        self._require_model(name)
        with self._write("registry") as db:
            db.run(
                "UPDATE model_versions SET pinned = ?, updated_at = ? WHERE version = ? AND model_id ="
                " (SELECT id FROM models WHERE name = ? AND vendor = '')",
                (int(pinned), utcnow(), name.tag, name.name),
            )
        return self._require_model(name)

    def touch_model(self, name: ModelName) -> None:
        with self._write() as db:
            db.run(
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
            db.run(
                "UPDATE blobs SET state = ?, last_verified_at = ?, link_stat = COALESCE(?, link_stat)"
                " WHERE digest = ?",
                (state, utcnow(), link_stat, digest),
            )

    def forget_blobs(self, digests: Sequence[str]) -> None:
        with self._write("registry") as db:
            for digest in digests:
                db.run(
                    "DELETE FROM blobs WHERE digest = ? AND NOT EXISTS"
                    " (SELECT 1 FROM model_artifacts WHERE sha256 = ?)",
                    (digest, digest),
                )

    # -- audit -------------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> AuditEvent:
        with self._write() as db:
            ((event_id,),) = db.rows(
                "INSERT INTO audit_log (at, actor, action, target, outcome, bytes, duration_ms,"
                " correlation_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
        with self._write("downloads") as db:
            db.run(*_insert("downloads", {name: getattr(download, name) for name in _DOWNLOAD_COLUMNS}))
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
            changed = db.run(
                f"UPDATE downloads SET {assignments} WHERE id = ?{condition}",
                [*columns.values(), download_id, *only_from],
            )
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
            f" ORDER BY created_at DESC, {self._INSERT_ORDER} DESC LIMIT ?",
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
        artifact = next(
            a for a in model.artifacts if source_uri in (a.source_uri, (a.source_uri or "").split("#")[0])
        )
        return model, artifact

    # -- tasks -------------------------------------------------------------------------------

    def create_task(self, task: Task) -> tuple[Task, bool]:
        row = {name: _task_value(name, getattr(task, name)) for name in _TASK_COLUMNS}
        # A row without a key never conflicts (NULLs are distinct); one whose actor already has
        # the key adds nothing, even when another server adds it at the same moment.
        with self._write("tasks") as db:
            added = db.run(*_insert("tasks", row, " ON CONFLICT (actor, idempotency_key) DO NOTHING"))
            if not added:
                found = db.rows(
                    f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE actor = ? AND idempotency_key = ?",
                    (task.actor, task.idempotency_key),
                )
                return _task(found[0]), False
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
            f" ORDER BY created_at DESC, {self._INSERT_ORDER} DESC LIMIT ?",
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
            changed = db.run(
                f"UPDATE tasks SET {assignments} WHERE id = ?{condition}",
                [*values, task_id, *only_from, *owner, *attempt],
            )
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

    def claim_task(
        self, *, owner: str, lease_expires_at: str, modes: Sequence[TaskMode] = (), server: str | None = None
    ) -> Task | None:
        where, params = _where(within={"state": ("queued",), "mode": modes}, equal={})
        if server is not None:
            where += " AND (attachments_on IS NULL OR attachments_on = ?)"
            params.append(server)
        # Read first: an idle queue asks often, and a read takes no write lock.
        if not self._query(f"SELECT 1 FROM tasks {where} LIMIT 1", params):
            return None
        with self._write("tasks") as db:
            rows = db.rows(
                f"SELECT id FROM tasks {where} ORDER BY created_at, {self._INSERT_ORDER} LIMIT 1"
                f"{self._CLAIM_LOCK}",
                params,
            )
            if not rows:
                return None
            found = db.rows(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, lease_owner = ?,"
                " lease_expires_at = ?, started_at = ?, finished_at = NULL, result = NULL,"
                " ran_on = coalesce(?, ran_on) WHERE id = ?"
                f" RETURNING {', '.join(_TASK_COLUMNS)}",
                (owner, lease_expires_at, utcnow(), server, rows[0][0]),
            )
        return _task(found[0])

    # -- inference -------------------------------------------------------------------------------

    def append_inference(self, record: InferenceRecord) -> None:
        with self._write() as db:
            db.run(
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
                db.run("DELETE FROM preferences WHERE key = ?", (key,))
                return
            db.run(
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
            if not db.run(*_insert("users", row, " ON CONFLICT (name) DO NOTHING")):
                raise UserExists(f"user {user.name!r} already exists")
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
            changed = db.run(
                f"UPDATE users SET {', '.join(f'{column} = ?' for column in columns)} WHERE name = ?",
                [*columns.values(), name],
            )
        user = self.get_user(name)
        if not changed or user is None:
            raise UserNotFound(f"no user {name!r}")
        return user

    def remove_user(self, name: str) -> User:
        user = self.get_user(name)
        with self._write() as db:
            if not db.run("DELETE FROM users WHERE name = ?", (name,)) or user is None:
                raise UserNotFound(f"no user {name!r}")
        return user

    def create_api_key(self, key: ApiKey) -> ApiKey:
        with self._write() as db:
            if key.user_name is not None and not db.rows(
                "SELECT 1 FROM users WHERE name = ?", (key.user_name,)
            ):
                raise UserNotFound(f"no user {key.user_name!r}")
            db.run(*_insert("api_keys", {name: getattr(key, name) for name in _KEY_COLUMNS}))
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
        order = f"ORDER BY created_at, {self._INSERT_ORDER}"
        if user_name is None:
            return self._keys(order)
        return self._keys(f"WHERE user_name = ? {order}", (user_name,))

    def revoke_api_key(self, key_id: str) -> ApiKey:
        with self._write() as db:
            changed = db.run(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (utcnow(), key_id)
            )
        key = self.get_api_key(key_id)
        if not changed or key is None:
            raise ApiKeyNotFound(f"no API key {key_id!r}")
        return key

    def touch_api_key(self, key_id: str, at: str) -> None:
        with self._write() as db:
            db.run("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (at, key_id))

    # -- browser logins ------------------------------------------------------------------------

    def create_login_session(self, session: LoginSession) -> LoginSession:
        with self._write() as db:
            if not db.rows("SELECT 1 FROM users WHERE name = ?", (session.user_name,)):
                raise UserNotFound(f"no user {session.user_name!r}")
            db.run("DELETE FROM login_sessions WHERE expires_at < ?", (session.created_at,))
            db.run(*_insert("login_sessions", {name: getattr(session, name) for name in _SESSION_COLUMNS}))
        return session

    def get_login_session(self, id_sha256: str) -> LoginSession | None:
        columns = ", ".join(_SESSION_COLUMNS)
        rows = self._query(f"SELECT {columns} FROM login_sessions WHERE id_sha256 = ?", (id_sha256,))
        return LoginSession(*rows[0]) if rows else None

    def delete_login_session(self, id_sha256: str) -> bool:
        with self._write() as db:
            return bool(db.run("DELETE FROM login_sessions WHERE id_sha256 = ?", (id_sha256,)))

    def delete_login_sessions(self, user_name: str) -> int:
        with self._write() as db:
            return db.run("DELETE FROM login_sessions WHERE user_name = ?", (user_name,))

    # -- cluster -----------------------------------------------------------------------------

    def create_join_token(self, token: JoinToken) -> JoinToken:
        with self._write() as db:
            db.run(*_insert("join_tokens", {name: getattr(token, name) for name in _JOIN_TOKEN_COLUMNS}))
        return token

    def _join_tokens(self, where: str, params: Sequence[Any] = ()) -> list[JoinToken]:
        rows = self._query(f"SELECT {', '.join(_JOIN_TOKEN_COLUMNS)} FROM join_tokens {where}", params)
        return [JoinToken(*row) for row in rows]

    def get_join_token(self, token_id: str) -> JoinToken | None:
        found = self._join_tokens("WHERE id = ?", (token_id,))
        return found[0] if found else None

    def list_join_tokens(self) -> list[JoinToken]:
        return self._join_tokens(f"ORDER BY created_at, {self._INSERT_ORDER}")

    def revoke_join_token(self, token_id: str) -> JoinToken:
        with self._write() as db:
            changed = db.run(
                "UPDATE join_tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (utcnow(), token_id),
            )
        token = self.get_join_token(token_id)
        if not changed or token is None:
            raise JoinTokenNotFound(f"no join token {token_id!r}")
        return token

    def create_node(self, node: Node) -> Node:
        row = {name: _node_value(name, getattr(node, name)) for name in _NODE_COLUMNS}
        with self._write() as db:
            if not db.run(*_insert("nodes", row, " ON CONFLICT (name) DO NOTHING")):
                raise NodeExists(f"a node named {node.name!r} has already joined")
            if node.token_id is not None:
                db.run("UPDATE join_tokens SET uses = uses + 1 WHERE id = ?", (node.token_id,))
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
            if not db.rows("SELECT 1 FROM nodes WHERE id = ?", (node_id,)):
                raise NodeNotFound(f"no node {node_id!r}")
            if changes:
                assignments = ", ".join(f"{name} = ?" for name in changes)
                values = [_node_value(name, value) for name, value in changes.items()]
                db.run(f"UPDATE nodes SET {assignments} WHERE id = ?", [*values, node_id])
            if models is not None:
                db.run("DELETE FROM node_model_availability WHERE node_id = ?", (node_id,))
                columns = ", ".join(_NODE_MODEL_COLUMNS)
                # A digest listed twice keeps its last entry.
                db.run_many(
                    f"INSERT INTO node_model_availability (node_id, {columns}) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (node_id, digest) DO UPDATE SET model = excluded.model,"
                    " state = excluded.state, reason = excluded.reason, updated_at = excluded.updated_at",
                    [(node_id, m.digest, m.model, m.state, m.reason, m.updated_at) for m in models],
                )
        found = self.get_node(node_id)
        if found is None:  # removed between the write and this read
            raise NodeNotFound(f"no node {node_id!r}")
        return found

    def remove_node(self, node_id: str) -> Node:
        node = self.get_node(node_id)
        with self._write() as db:
            if not db.run("DELETE FROM nodes WHERE id = ?", (node_id,)) or node is None:
                raise NodeNotFound(f"no node {node_id!r}")
        return node

    # -- servers sharing this store ----------------------------------------------------------------

    def register_server(self, server: Server) -> Server:
        row = {name: getattr(server, name) for name in _SERVER_COLUMNS}
        updates = ", ".join(f"{name} = excluded.{name}" for name in _SERVER_COLUMNS[1:])
        with self._write() as db:
            db.run(*_insert("servers", row, f" ON CONFLICT (id) DO UPDATE SET {updates}"))
        return server

    def touch_server(self, server_id: str, at: str) -> bool:
        with self._write() as db:
            return bool(db.run("UPDATE servers SET last_seen_at = ? WHERE id = ?", (at, server_id)))

    def _servers(self, where: str, params: Sequence[Any] = ()) -> list[Server]:
        rows = self._query(f"SELECT {', '.join(_SERVER_COLUMNS)} FROM servers {where}", params)
        return [Server(*row) for row in rows]

    def find_server(self, credential_hash: str) -> Server | None:
        found = self._servers("WHERE credential_hash = ?", (credential_hash,))
        return found[0] if found else None

    def list_servers(self) -> list[Server]:
        return self._servers("ORDER BY started_at, id")

    # -- external providers --------------------------------------------------------------------

    def add_provider(self, provider: Provider, ciphertext: bytes | None) -> Provider:
        with self._write() as db:
            if not db.run(*_insert("providers", _provider_row(provider), " ON CONFLICT (name) DO NOTHING")):
                raise ProviderExists(f"a provider named {provider.name!r} already exists")
            if ciphertext is not None:
                db.run(
                    "INSERT INTO provider_credentials (provider, ciphertext, set_at) VALUES (?, ?, ?)",
                    (provider.name, ciphertext, provider.updated_at),
                )
        return self._require_provider(provider.name)

    def update_provider(self, provider: Provider) -> Provider:
        row = _provider_row(provider)
        row["updated_at"] = utcnow()
        del row["name"], row["created_at"]
        with self._write() as db:
            assignments = ", ".join(f"{name} = ?" for name in row)
            if not db.run(
                f"UPDATE providers SET {assignments} WHERE name = ?", (*row.values(), provider.name)
            ):
                raise ProviderNotFound(f"no provider named {provider.name!r}")
        return self._require_provider(provider.name)

    def set_provider_key(self, name: str, ciphertext: bytes | None) -> Provider:
        now = utcnow()
        with self._write() as db:
            if not db.run("UPDATE providers SET updated_at = ? WHERE name = ?", (now, name)):
                raise ProviderNotFound(f"no provider named {name!r}")
            db.run("DELETE FROM provider_credentials WHERE provider = ?", (name,))
            if ciphertext is not None:
                db.run(
                    "INSERT INTO provider_credentials (provider, ciphertext, set_at) VALUES (?, ?, ?)",
                    (name, ciphertext, now),
                )
        return self._require_provider(name)

    def get_provider(self, name: str) -> Provider | None:
        rows = self._query(f"{_PROVIDER_SELECT} WHERE p.name = ?", (name,))
        return _provider(rows[0]) if rows else None

    def _require_provider(self, name: str) -> Provider:
        found = self.get_provider(name)
        if found is None:
            raise ProviderNotFound(f"no provider named {name!r}")
        return found

    def list_providers(self) -> list[Provider]:
        return [_provider(row) for row in self._query(f"{_PROVIDER_SELECT} ORDER BY p.name")]

    def provider_ciphertext(self, name: str) -> bytes | None:
        rows = self._query("SELECT ciphertext FROM provider_credentials WHERE provider = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    def remove_provider(self, name: str) -> bool:
        with self._write() as db:
            db.run("DELETE FROM provider_credentials WHERE provider = ?", (name,))
            return bool(db.run("DELETE FROM providers WHERE name = ?", (name,)))
