"""The Store protocol and the typed records it returns.

SQL lives only in this package. Callers get these records, never cursors, and hold a
``Store``, never a backend: ``factory.open_store`` picks the backend ``store.url`` names.
The SQLite backend (``sqlite.py``) is the embedded default; the PostgreSQL backend
(``postgres.py``) is the one several servers share. Both run the SQL of ``sql.py``, and every
backend passes ``tests/store/test_contract.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypedDict, Unpack, runtime_checkable

from appliance.names import ModelName
from appliance.store.feed import ChangeFeed
from appliance.store.locks import Locks

__all__ = [
    "ACTIVE_DOWNLOAD_STATES",
    "FINISHED_TASK_STATES",
    "LISTED_CAPABILITIES",
    "ApiKey",
    "Artifact",
    "AuditEvent",
    "Blob",
    "BlobState",
    "Download",
    "DownloadChanges",
    "DownloadState",
    "InferenceRecord",
    "JoinToken",
    "LoginSession",
    "Model",
    "ModelSummary",
    "NewArtifact",
    "Node",
    "NodeChanges",
    "NodeModel",
    "NodeModelState",
    "Operation",
    "Provider",
    "ProviderKind",
    "RemovedModel",
    "Server",
    "Store",
    "Task",
    "TaskChanges",
    "TaskMode",
    "TaskState",
    "User",
    "UserRole",
    "utcnow",
]

BlobState = Literal["ok", "quarantined"]
# queued: cleared to run (no approval needed, or approved), waiting for a download slot;
# interrupted: the process that ran it ended (killed, stopped) before it did; a later pull resumes it
DownloadState = Literal[
    "pending", "approved", "queued", "running", "done", "failed", "denied", "cancelled", "interrupted"
]
# A process owns a download in these states.
ACTIVE_DOWNLOAD_STATES: tuple[DownloadState, ...] = ("pending", "approved", "queued", "running")


TaskMode = Literal["prompt", "script", "commands"]
TaskState = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINISHED_TASK_STATES: tuple[TaskState, ...] = ("succeeded", "failed", "canceled")


def utcnow() -> str:
    """A UTC timestamp as stored: ISO 8601 with microseconds, so text order is time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size_bytes: int
    state: BlobState
    created_at: str
    last_verified_at: str | None
    # A blob hard-linked to a file outside the cache: its inode identity when last verified.
    link_stat: str | None = None


@dataclass(frozen=True)
class Artifact:
    filename: str
    format: str
    digest: str
    size_bytes: int
    source_uri: str | None
    created_at: str
    state: BlobState


@dataclass(frozen=True)
class NewArtifact:
    filename: str
    format: str
    digest: str
    size_bytes: int
    source_uri: str | None
    link_stat: str | None = None  # see Blob.link_stat


@dataclass(frozen=True)
class Model:
    """One ``name:tag``: a model version with its artifacts."""

    name: ModelName
    capabilities: dict[str, Any]
    pinned: bool
    created_at: str
    updated_at: str
    last_used_at: str
    artifacts: tuple[Artifact, ...] = field(default_factory=tuple)

    @property
    def size_bytes(self) -> int:
        return sum(artifact.size_bytes for artifact in self.artifacts)

    @property
    def formats(self) -> list[str]:
        return sorted({artifact.format for artifact in self.artifacts})

    @property
    def state(self) -> BlobState:
        return "quarantined" if any(a.state == "quarantined" for a in self.artifacts) else "ok"


# The capabilities a model list shows (Ollama's details); a summary reads only these.
LISTED_CAPABILITIES = ("architecture", "parameter_count", "quantization")


@dataclass(frozen=True)
class ModelSummary:
    """What a list of models shows of one: ``Model`` without its artifacts' rows and with only
    the ``LISTED_CAPABILITIES`` it has, so listing thousands reads little."""

    name: ModelName
    capabilities: dict[str, Any]
    pinned: bool
    created_at: str
    updated_at: str
    size_bytes: int
    formats: tuple[str, ...]  # sorted
    state: BlobState
    first_digest: str | None  # of the first artifact by filename, as Model.artifacts[0]
    gguf_digest: str | None  # of the first GGUF by filename


@dataclass(frozen=True)
class RemovedModel:
    """What deleting a model freed: the digests no row references any more, and their bytes."""

    model: Model
    orphaned_digests: tuple[str, ...]
    freed_bytes: int


@dataclass(frozen=True)
class AuditEvent:
    actor: str
    action: str
    target: str
    outcome: Literal["ok", "error"]
    correlation_id: str
    bytes: int | None = None
    duration_ms: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=utcnow)
    id: int | None = None


@dataclass(frozen=True)
class Download:
    """One pull that needed the network: its approval, progress and outcome."""

    id: str
    ref: str
    state: DownloadState
    requested_by: str
    model_name: str | None = None
    expected_digest: str | None = None
    digest: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    rate_bytes_per_s: int = 0
    error: str | None = None
    decided_by: str | None = None
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)
    error_code: str | None = None  # the error's stable code, so a pull waiting on this one can raise it
    note: str | None = None  # what the user should know about how it runs (e.g. why it starts over)


class DownloadChanges(TypedDict, total=False):
    """The columns of a download row that ``update_download`` may set (the others never change)."""

    state: DownloadState
    model_name: str | None
    expected_digest: str | None
    digest: str | None
    bytes_done: int
    bytes_total: int | None
    rate_bytes_per_s: int
    error: str | None
    decided_by: str | None
    error_code: str | None
    note: str | None


@dataclass(frozen=True)
class InferenceRecord:
    """One served request: where it ran and why (REQ-MODELS-0118), and what it cost."""

    model: str
    endpoint: str
    engine: str
    node: str
    reason: str
    outcome: str
    prompt_tokens: int
    completion_tokens: int
    duration_ms: int
    correlation_id: str
    at: str = field(default_factory=utcnow)
    id: int | None = None


@dataclass(frozen=True)
class Task:
    """Work a user handed the appliance: a prompt for a model, or a script or commands for the
    sandbox. ``limits`` are the job's (``Limits`` fields); ``result`` is set once it ended (exit
    code, signal, duration, peak memory, truncated flags, reason). Its output is in files."""

    id: str
    mode: TaskMode
    text: str
    model: str | None
    state: TaskState
    actor: str
    limits: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0  # how many times it was started
    lease_owner: str | None = None  # the process running it
    lease_expires_at: str | None = None  # past this, a process that stopped renewing it is gone
    idempotency_key: str | None = None
    result: dict[str, Any] | None = None
    created_at: str = field(default_factory=utcnow)
    started_at: str | None = None
    finished_at: str | None = None
    # Servers sharing the store keep task files in their own data dirs: the one holding its
    # attachments (only it claims the task), and the one that last claimed it (its output is there).
    attachments_on: str | None = None
    ran_on: str | None = None


class TaskChanges(TypedDict, total=False):
    """The columns of a task row that ``update_task`` may set."""

    state: TaskState
    attempts: int
    lease_owner: str | None
    lease_expires_at: str | None
    result: dict[str, Any] | None
    started_at: str | None
    finished_at: str | None


UserRole = Literal["admin", "user", "node"]


@dataclass(frozen=True)
class User:
    name: str
    role: UserRole
    password_hash: str | None  # argon2; None for an account only its API keys act for (a node)
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: the secret only as its SHA-256, its first characters to recognise it."""

    id: str
    name: str
    prefix: str
    secret_sha256: str
    role: UserRole
    user_name: str | None  # the user it acts for; None for a key of its own (a service's)
    created_by: str
    created_at: str = field(default_factory=utcnow)
    expires_at: str | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None


@dataclass(frozen=True)
class LoginSession:
    """A browser login: the cookie's secret only as its SHA-256, and the CSRF token the page sends back."""

    id_sha256: str
    user_name: str
    csrf_token: str
    address: str
    created_at: str
    expires_at: str


@dataclass(frozen=True)
class JoinToken:
    """What lets a worker join: the secret only as its SHA-256; usable by many workers until it
    expires or is revoked."""

    id: str
    secret_hash: str
    created_by: str
    created_at: str = field(default_factory=utcnow)
    expires_at: str | None = None  # None: never
    revoked_at: str | None = None
    uses: int = 0  # how many nodes joined with it


NodeModelState = Literal["cached", "loading", "available", "failed"]


@dataclass(frozen=True)
class NodeModel:
    """A digest a node holds (cached) or serves (loading, available), or failed to load, as its
    last heartbeat reported it."""

    digest: str
    model: str
    state: NodeModelState
    reason: str | None = None
    updated_at: str = field(default_factory=utcnow)


@dataclass(frozen=True)
class Node:
    """A worker that joined: its credential only as its SHA-256, what it last reported, and the
    configuration the server holds for it (``config_version`` is a ULID; ``config_applied`` the
    one it acknowledged). Whether it is ready, draining or unavailable is derived, not stored."""

    id: str
    name: str
    credential_hash: str
    config_version: str
    token_id: str | None = None
    joined_at: str = field(default_factory=utcnow)
    drained: bool = False
    last_heartbeat_at: str | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    config_applied: str | None = None
    models: tuple[NodeModel, ...] = ()


class NodeChanges(TypedDict, total=False):
    """The columns of a node row that ``update_node`` may set."""

    drained: bool
    last_heartbeat_at: str | None
    capabilities: dict[str, Any]
    load: dict[str, Any]
    config: dict[str, Any]
    config_version: str
    config_applied: str | None


@dataclass(frozen=True)
class Server:
    """A server process sharing this store: the URL its peers reach it at, its credential for
    their blob fetches only as its SHA-256, and when it was last heard of (alive while recent).
    ``ca_pem`` is the CA its TLS certificate chains to, when that is its own (``tls init``)."""

    id: str
    url: str
    credential_hash: str
    version: str
    started_at: str = field(default_factory=utcnow)
    last_seen_at: str = field(default_factory=utcnow)
    ca_pem: str | None = None


ProviderKind = Literal["openai", "anthropic"]
# What a call to a provider does: the allow-list a provider's ``operations`` holds.
Operation = Literal["chat", "complete", "embed", "models"]


@dataclass(frozen=True)
class Provider:
    """An external provider as every surface shows it: its key is only ever ``key_set`` (the
    ciphertext sits in ``provider_credentials``, read by the egress component alone)."""

    name: str
    kind: ProviderKind
    base_url: str  # e.g. https://api.openai.com/v1 (openai) or https://api.anthropic.com (anthropic)
    models: tuple[str, ...] = ()  # the model names it serves; empty: whatever name is asked for
    operations: tuple[Operation, ...] = ("chat", "complete", "embed", "models")
    # Who may have calls made on their behalf: "*", "role:admin", "role:user", "user:NAME",
    # "key:ID", "task" (a task's job). A call whose subject matches none is refused.
    subjects: tuple[str, ...] = ("*",)
    key_set: bool = False
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models


@runtime_checkable
class Store(Protocol):
    """Persistence for the registry, the audit log and the preferences."""

    def close(self) -> None: ...

    # between processes
    def shared_locks(self) -> Locks | None:
        """Locks every server sharing this store sees (PostgreSQL's advisory locks); None for a store
        in one machine's file, whose processes use ``FileLocks`` in the data dir."""
        ...

    def change_feed(self) -> ChangeFeed:
        """Counters that move when a write changes a topic's rows: this process's writes and, on a
        store several servers share, theirs too. Callers still poll slowly as a fallback."""
        ...

    # schema
    def applied_migrations(self) -> list[str]:
        """The names of the migrations applied, in the order they were."""
        ...

    # models
    def get_model(self, name: ModelName) -> Model | None: ...
    def list_models(self, *, after: ModelName | None = None, limit: int | None = None) -> list[Model]:
        """By name, then tag; only those past ``after`` and at most ``limit`` when given."""
        ...

    def list_model_summaries(
        self, *, after: ModelName | None = None, limit: int | None = None, gguf_only: bool = False
    ) -> list[ModelSummary]:
        """``list_models``'s order and paging, reading only what a list shows; with ``gguf_only``,
        only the models that hold a GGUF."""
        ...

    def has_loadable_model(self) -> bool:
        """Whether some model holds a GGUF whose blobs are all intact (cheap at any count)."""
        ...

    def registry_generation(self) -> int:
        """A number that changes with every write, by any process, to what a model list shows."""
        ...

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
        """Register an artifact under ``name``; returns the model and whether anything was added.

        The files named in ``replacing`` leave the model in the same transaction (their blob rows
        stay: ``forget_blobs`` drops the ones nothing references any more). Raises ModelExists
        when ``name`` still has a file of that filename with other content or, with
        ``sole_format``, another file of the artifact's format with other content.
        """
        ...

    def add_artifacts(
        self,
        name: ModelName,
        artifacts: Sequence[NewArtifact],
        *,
        capabilities: dict[str, Any],
        actor: str,
        sole_formats: Collection[str] = (),
    ) -> tuple[Model, bool]:
        """Register several artifacts under ``name`` in one transaction (a model that must appear
        whole, as a bundle's): all of them or, on ModelExists (as ``add_artifact`` raises it, with
        ``sole_format`` for the formats in ``sole_formats``), none. Returns the model and whether
        anything was added."""
        ...

    def remove_model(self, name: ModelName) -> RemovedModel: ...
    def set_pinned(self, name: ModelName, pinned: bool) -> Model: ...
    def touch_model(self, name: ModelName) -> None: ...

    # blobs
    def get_blob(self, digest: str) -> Blob | None: ...
    def list_blobs(self) -> list[Blob]: ...
    def cache_bytes(self) -> int: ...
    def mark_verified(self, digest: str, *, state: BlobState, link_stat: str | None = None) -> None:
        """Record a verification; ``link_stat`` (when given) is the linked inode's identity as hashed."""
        ...

    def forget_blobs(self, digests: Sequence[str]) -> None:
        """Drop blob rows no artifact references (after their files are gone)."""
        ...

    # audit
    def append_audit(self, event: AuditEvent) -> AuditEvent: ...
    def list_audit(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
    ) -> list[AuditEvent]: ...

    # downloads
    def create_download(self, download: Download) -> Download: ...
    def update_download(
        self,
        download_id: str,
        *,
        only_from: Sequence[DownloadState] = (),
        **changes: Unpack[DownloadChanges],
    ) -> Download:
        """Set columns of one download (and ``updated_at``), atomically checking that its state is one
        of ``only_from`` when given; raises DownloadNotFound or DownloadNotPending."""
        ...

    def get_download(self, download_id: str) -> Download | None: ...
    def list_downloads(
        self, *, states: Sequence[str] = (), ref: str | None = None, limit: int = 100
    ) -> list[Download]:
        """Newest first."""
        ...

    def find_artifact_by_source(self, source_uri: str) -> tuple[Model, Artifact] | None:
        """The newest registered artifact fetched from ``source_uri`` (or, for a repo, from
        ``source_uri#file``), with its model."""
        ...

    # tasks
    def create_task(self, task: Task) -> tuple[Task, bool]:
        """Add ``task``, unless its actor already has a task of its idempotency key: then that
        one, untouched. Returns the task and whether it was added."""
        ...

    def get_task(self, task_id: str) -> Task | None: ...
    def list_tasks(
        self, *, states: Sequence[TaskState] = (), actor: str | None = None, limit: int = 100
    ) -> list[Task]:
        """Newest first; only those in ``states`` and of ``actor`` when given."""
        ...

    def update_task(
        self,
        task_id: str,
        *,
        only_from: Sequence[TaskState] = (),
        only_owner: str | None = None,
        only_attempt: int | None = None,
        **changes: Unpack[TaskChanges],
    ) -> Task:
        """Set columns of one task, atomically checking that its state is one of ``only_from``,
        its lease is ``only_owner``'s and its ``attempts`` is ``only_attempt``, when given; raises
        TaskNotFound, TaskFinished (it is in another state) or LeaseLost (its state fits, but
        another owner holds it or it is on another attempt)."""
        ...

    def claim_task(
        self, *, owner: str, lease_expires_at: str, modes: Sequence[TaskMode] = (), server: str | None = None
    ) -> Task | None:
        """The oldest queued task (of one of ``modes``, when given), now running for ``owner``
        (attempts counted, started now), or None when none waits. Two processes never claim the
        same task. With ``server``, only tasks whose attachments are on no other server, and the
        task's ``ran_on`` becomes ``server``."""
        ...

    # inference
    def append_inference(self, record: InferenceRecord) -> None: ...
    def list_inference(self, *, model: str | None = None, limit: int = 100) -> list[InferenceRecord]: ...

    # preferences
    def get_preference(self, key: str) -> Any | None: ...
    def set_preference(self, key: str, value: Any, *, actor: str) -> None: ...
    def list_preferences(self) -> dict[str, Any]: ...

    # users and API keys
    def create_user(self, user: User) -> User:
        """Raises UserExists when the name is taken."""
        ...

    def get_user(self, name: str) -> User | None: ...
    def list_users(self) -> list[User]: ...
    def update_user(
        self, name: str, *, role: UserRole | None = None, password_hash: str | None = None
    ) -> User:
        """Set the role and/or the password hash; raises UserNotFound."""
        ...

    def remove_user(self, name: str) -> User:
        """Remove a user and, in the same write, their API keys; raises UserNotFound."""
        ...

    def create_api_key(self, key: ApiKey) -> ApiKey: ...
    def get_api_key(self, key_id: str) -> ApiKey | None: ...
    def find_api_key(self, secret_sha256: str) -> ApiKey | None: ...
    def list_api_keys(self, *, user_name: str | None = None) -> list[ApiKey]:
        """Oldest first; only ``user_name``'s when given."""
        ...

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Mark revoked (the row stays, for the audit trail); raises ApiKeyNotFound. A second
        revocation keeps the first one's time."""
        ...

    def touch_api_key(self, key_id: str, at: str) -> None: ...

    # browser logins
    def create_login_session(self, session: LoginSession) -> LoginSession:
        """Also drops the sessions that expired before it began; raises UserNotFound."""
        ...

    def get_login_session(self, id_sha256: str) -> LoginSession | None: ...
    def delete_login_session(self, id_sha256: str) -> bool: ...
    def delete_login_sessions(self, user_name: str) -> int:
        """End every login of a user (their password changed); how many there were."""
        ...

    # cluster
    def create_join_token(self, token: JoinToken) -> JoinToken: ...
    def get_join_token(self, token_id: str) -> JoinToken | None: ...
    def list_join_tokens(self) -> list[JoinToken]:
        """Oldest first."""
        ...

    def revoke_join_token(self, token_id: str) -> JoinToken:
        """Mark revoked (the row stays); raises JoinTokenNotFound. A second revocation keeps the
        first one's time."""
        ...

    def create_node(self, node: Node) -> Node:
        """Add a node and count a use of its join token, in one write; raises NodeExists when its
        name is taken."""
        ...

    def get_node(self, id_or_name: str) -> Node | None:
        """By id, else by name."""
        ...

    def find_node(self, credential_hash: str) -> Node | None: ...
    def list_nodes(self) -> list[Node]:
        """By name."""
        ...

    def update_node(
        self, node_id: str, *, models: Sequence[NodeModel] | None = None, **changes: Unpack[NodeChanges]
    ) -> Node:
        """Set columns of one node and, when ``models`` is given, replace its availability list
        with it, in one write; raises NodeNotFound."""
        ...

    def remove_node(self, node_id: str) -> Node:
        """Forget a node and its availability (its credential with it); raises NodeNotFound."""
        ...

    # servers sharing this store
    def register_server(self, server: Server) -> Server:
        """Add the server, or replace the row of its id (a restart: new URL, credential, times)."""
        ...

    def touch_server(self, server_id: str, at: str) -> bool:
        """Record that the server was alive at ``at``; False when it has no row (forgotten)."""
        ...

    def find_server(self, credential_hash: str) -> Server | None: ...
    def list_servers(self) -> list[Server]:
        """Oldest start first."""
        ...

    # external providers (their keys as ciphertext only: the egress component seals and opens them)
    def add_provider(self, provider: Provider, ciphertext: bytes | None) -> Provider:
        """Add it (with its sealed key, if any); raises ProviderExists for a name taken."""
        ...

    def update_provider(self, provider: Provider) -> Provider:
        """Replace its fields but the name and key (updated_at set); raises ProviderNotFound."""
        ...

    def set_provider_key(self, name: str, ciphertext: bytes | None) -> Provider:
        """Set or (None) clear its sealed key; raises ProviderNotFound."""
        ...

    def get_provider(self, name: str) -> Provider | None: ...
    def list_providers(self) -> list[Provider]:
        """By name."""
        ...

    def provider_ciphertext(self, name: str) -> bytes | None:
        """Its sealed key; None when it has none (or no such provider)."""
        ...

    def remove_provider(self, name: str) -> bool:
        """Remove it and its key; False when there was none."""
        ...
