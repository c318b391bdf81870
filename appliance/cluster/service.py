"""The nodes as the server keeps them: join tokens, joins, heartbeats, per-node configuration, and
what routing reads (``available_nodes``).

Synchronous and store-backed (called in threads). A node's state is derived when read:
``draining`` when drained, ``unavailable`` when its last heartbeat is older than
``cluster.heartbeat_timeout``, else ``ready``. Its configuration (the models it must keep cached
and loaded) carries a ULID ``config_version``; each change makes a newer one, and the worker
acknowledges the one it applied in its next heartbeat.

Audited: ``nodes.join`` (ok and refused), ``nodes.token.create``, ``nodes.token.revoke``,
``nodes.drain``, ``nodes.undrain``, ``nodes.rm``, ``nodes.assign``, ``nodes.unassign``.

Imports: the store, the registry, the router's ``resolve_spec``, audit, settings, tls, and this
package's tokens and wire.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from ulid import ULID

from appliance.audit import AuditNote, Context, audited, record
from appliance.cluster.tokens import (
    JoinTokenText,
    hash_secret,
    is_node_credential,
    make_credential,
    make_join_token,
    parse_join_token,
)
from appliance.cluster.wire import encode_spec
from appliance.engine.router import resolve_spec
from appliance.errors import InvalidInput, ModelNotFound, NodeNotFound, NotFound, Unauthorized
from appliance.models.service import ModelService
from appliance.names import ModelName
from appliance.settings import TOKEN_EXPIRY_PATTERN, Settings
from appliance.store.base import JoinToken, Node, NodeModel, NodeModelState, Store, utcnow

__all__ = [
    "NODE_NAME_PATTERN",
    "ClusterService",
    "HeartbeatIn",
    "HeartbeatReply",
    "JoinTokenOut",
    "Joined",
    "NewJoinTokenOut",
    "Node",
    "NodeOut",
    "NodeState",
    "NodeView",
]

NODE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NODE_NAME = re.compile(NODE_NAME_PATTERN)
_EXPIRY = re.compile(TOKEN_EXPIRY_PATTERN)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The local engine's name in routing decisions, and a path of the nodes API: no worker may take them.
LOCAL_NODE = "local"
_RESERVED_NAMES = (LOCAL_NODE, "tokens")

NodeState = Literal["ready", "draining", "unavailable"]


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _next_version(previous: str | None) -> str:
    """A ULID newer than ``previous``, even within the same millisecond (a ULID's random part
    does not order two made then)."""
    made = str(ULID())
    if previous is not None and made <= previous:
        made = str(ULID.from_int(int(ULID.from_str(previous)) + 1))
    return made


def expiry_of(text: str) -> str | None:
    """'24h' (also s, m, d, w) from now as a stored timestamp, or None for 'never'."""
    if not _EXPIRY.match(text.strip()):
        raise InvalidInput(
            f"{text!r} is not a join token lifetime",
            hint="write a number with s, m, h, d or w (like 1h, 24h, 7d), or never",
        )
    text = text.strip()
    if text == "never":
        return None
    return _stamp(datetime.now(UTC) + timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]]))


# -- schemas -----------------------------------------------------------------------------------


class JoinTokenOut(BaseModel):
    """A join token as listed: never its secret."""

    id: str
    state: str  # active, revoked or expired
    created_by: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    uses: int

    @classmethod
    def of(cls, token: JoinToken) -> JoinTokenOut:
        return cls(
            id=token.id,
            state=_token_state(token),
            created_by=token.created_by,
            created_at=token.created_at,
            expires_at=token.expires_at,
            revoked_at=token.revoked_at,
            uses=token.uses,
        )


class NewJoinTokenOut(BaseModel):
    """A token just made: the only time its text is shown."""

    id: str
    token: str
    expires_at: str | None


class Joined(BaseModel):
    """What a join answers: the node credential, shown this once."""

    node_id: str
    name: str
    credential: str
    heartbeat_interval: float
    config_version: str


class LoadIn(BaseModel):
    active: int = Field(default=0, ge=0)
    queued: int = Field(default=0, ge=0)
    loaded: list[str] = Field(default_factory=list)


class ModelAvailabilityIn(BaseModel):
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    model: str = Field("", max_length=300)
    state: NodeModelState
    reason: str | None = Field(None, max_length=4000)


class HeartbeatIn(BaseModel):
    """A worker's report: ``capabilities`` None when unchanged since its last one; ``models`` the
    full list of what it holds (every cached or loaded digest)."""

    capabilities: dict[str, Any] | None = None
    load: LoadIn = Field(default_factory=LoadIn)
    models: list[ModelAvailabilityIn] = Field(default_factory=list)
    config_applied: str | None = Field(None, pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")


class HeartbeatReply(BaseModel):
    """``config`` is there only when the worker has not applied ``config_version`` yet."""

    config_version: str
    config: dict[str, Any] | None
    drained: bool
    heartbeat_interval: float


class NodeModelOut(BaseModel):
    model: str
    digest: str
    state: str
    reason: str | None
    updated_at: str


class NodeOut(BaseModel):
    id: str
    name: str
    state: NodeState
    joined_at: str
    last_heartbeat_at: str | None
    seconds_since_heartbeat: float | None
    capabilities: dict[str, Any]
    load: dict[str, Any]
    config_version: str
    config_applied: str | None
    config: dict[str, Any]
    models: list[NodeModelOut]


@dataclass(frozen=True)
class NodeView:
    """A node routing may send work to (ready, not drained), as placement reads it."""

    id: str
    name: str
    memory_budget: int | None  # what the worker's engine may load, as it reported
    load: dict[str, Any]  # {"active", "queued", "loaded": [digest…]} at its last heartbeat
    models: dict[str, str] = field(default_factory=dict)  # digest -> cached, loading, available, failed


def _token_state(token: JoinToken) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= utcnow():
        return "expired"
    return "active"


# -- the service -------------------------------------------------------------------------------


class ClusterService:
    def __init__(self, settings: Settings, store: Store, models: ModelService) -> None:
        self.settings = settings
        self.cluster = settings.cluster
        self.store = store
        self.models = models
        self._config_lock = threading.Lock()  # one read-modify-write of a node's config at a time

    # -- join tokens ---------------------------------------------------------------------------

    def create_token(self, context: Context, *, expires: str | None = None) -> NewJoinTokenOut:
        """A join token carrying this server's CA fingerprint (``-`` when it has no TLS)."""
        expires_at = expiry_of(expires or self.cluster.token_expiry)
        text = make_join_token(self.fingerprint())
        token = JoinToken(
            id=text.token_id,
            secret_hash=hash_secret(text.secret),
            created_by=context.actor,
            expires_at=expires_at,
        )
        with audited(self.store, context, action="nodes.token.create", target=token.id) as note:
            note.detail.update(expires_at=expires_at, fingerprint=text.fingerprint)
            self.store.create_join_token(token)
        return NewJoinTokenOut(id=token.id, token=str(text), expires_at=expires_at)

    def fingerprint(self) -> str | None:
        """The fingerprint a worker pins: of ``server.tls_cert`` when set, else of the CA of
        ``appliance tls init``; None when the server answers plain HTTP."""
        from appliance.tls import ca_fingerprint, tls_files

        configured = self.settings.server.tls_cert
        if configured is not None:
            return ca_fingerprint(configured)
        made = tls_files(self.settings)
        return ca_fingerprint(made.ca_cert) if made.server.cert.exists() else None

    def list_tokens(self) -> list[JoinTokenOut]:
        return [JoinTokenOut.of(token) for token in self.store.list_join_tokens()]

    def revoke_token(self, token_id: str, context: Context) -> JoinTokenOut:
        """Revoke a join token; the nodes that joined with it stay."""
        with audited(self.store, context, action="nodes.token.revoke", target=token_id):
            token = self.store.revoke_join_token(token_id)
        return JoinTokenOut.of(token)

    # -- joining and authenticating ------------------------------------------------------------

    def join(self, token: str, name: str, capabilities: dict[str, Any], context: Context) -> Joined:
        """Trade a join token for a node credential (shown once). A wrong, expired or revoked token
        is Unauthorized; a name another node has is NodeExists. Both audited."""
        with audited(self.store, context, action="nodes.join", target=name) as note:
            parsed = self._check_token(token)
            note.detail["token"] = parsed.token_id
            if not _NODE_NAME.match(name) or name in _RESERVED_NAMES:
                raise InvalidInput(
                    f"{name!r} is not a node name",
                    hint="use 1 to 64 letters, digits and . _ -, starting with a letter or digit"
                    f" ({LOCAL_NODE!r} is the server's own engine, 'tokens' a path of the nodes API)",
                )
            credential = make_credential()
            node = Node(
                id=secrets.token_hex(8),
                name=name,
                credential_hash=hash_secret(credential),
                config_version=_next_version(None),
                token_id=parsed.token_id,
                capabilities=capabilities,
                config={"models": []},
            )
            self.store.create_node(node)
            note.detail["node"] = node.id
        return Joined(
            node_id=node.id,
            name=node.name,
            credential=credential,
            heartbeat_interval=self.cluster.heartbeat_interval,
            config_version=node.config_version,
        )

    def _check_token(self, text: str) -> JoinTokenText:
        try:
            parsed = parse_join_token(text)
        except InvalidInput as exc:
            raise Unauthorized(f"refused the join: {exc.message}", hint=exc.hint) from exc
        stored = self.store.get_join_token(parsed.token_id)
        if stored is None or not hmac.compare_digest(stored.secret_hash, hash_secret(parsed.secret)):
            raise Unauthorized(
                "refused the join: the join token is not one this server made",
                hint="make one on the server with `appliance nodes token create`",
            )
        state = _token_state(stored)
        if state != "active":
            raise Unauthorized(
                f"refused the join: the join token {stored.id} is {state}",
                hint="make a new one on the server with `appliance nodes token create`",
            )
        return parsed

    def authenticate(self, credential: str, context: Context | None = None) -> Node:
        """The node a credential belongs to; Unauthorized (audited when ``context`` is given)."""
        node = self.store.find_node(hash_secret(credential)) if is_node_credential(credential) else None
        if node is None:
            if context is not None:
                record(
                    self.store,
                    context,
                    action="auth.failed",
                    note=AuditNote(
                        target=credential[:13], outcome="error", detail={"reason": "unknown node credential"}
                    ),
                )
            raise Unauthorized(
                "this route needs a node credential this server knows (Authorization: Bearer apnode_…)",
                hint="a worker gets one by joining; a node that was removed must join again",
            )
        return node

    # -- heartbeats ----------------------------------------------------------------------------

    def heartbeat(self, node: Node, report: HeartbeatIn) -> HeartbeatReply:
        """Record the report; answer the config when the worker has not applied the latest."""
        now = utcnow()
        before = {m.digest: m for m in node.models}
        held = []
        for item in report.models:
            old = before.get(item.digest)
            unchanged = old is not None and (old.state, old.reason) == (item.state, item.reason)
            held.append(
                NodeModel(
                    item.digest,
                    item.model,
                    item.state,
                    item.reason,
                    old.updated_at if old is not None and unchanged else now,
                )
            )
        changes: dict[str, Any] = {"last_heartbeat_at": now, "load": report.load.model_dump()}
        if report.capabilities is not None:
            changes["capabilities"] = report.capabilities
        if report.config_applied is not None:
            changes["config_applied"] = report.config_applied
        current = self.store.update_node(node.id, models=held, **changes)
        return HeartbeatReply(
            config_version=current.config_version,
            config=current.config if report.config_applied != current.config_version else None,
            drained=current.drained,
            heartbeat_interval=self.cluster.heartbeat_interval,
        )

    # -- reading -------------------------------------------------------------------------------

    def state(self, node: Node) -> NodeState:
        if node.drained:
            return "draining"
        silent = self._silent_for(node)
        if silent is None or silent > self.cluster.heartbeat_timeout:
            return "unavailable"
        return "ready"

    def _silent_for(self, node: Node) -> float | None:
        if node.last_heartbeat_at is None:
            return None
        return max(0.0, (datetime.now(UTC) - _parse_stamp(node.last_heartbeat_at)).total_seconds())

    def nodes(self) -> list[Node]:
        """The rows, for the server's own sweep."""
        return self.store.list_nodes()

    def list_nodes(self) -> list[NodeOut]:
        return [self._out(node) for node in self.store.list_nodes()]

    def get_node(self, id_or_name: str) -> NodeOut:
        return self._out(self._require(id_or_name))

    def _require(self, id_or_name: str) -> Node:
        node = self.store.get_node(id_or_name)
        if node is None:
            raise NodeNotFound(f"no node {id_or_name!r}")
        return node

    def _out(self, node: Node) -> NodeOut:
        silent = self._silent_for(node)
        return NodeOut(
            id=node.id,
            name=node.name,
            state=self.state(node),
            joined_at=node.joined_at,
            last_heartbeat_at=node.last_heartbeat_at,
            seconds_since_heartbeat=None if silent is None else round(silent, 3),
            capabilities=node.capabilities,
            load=node.load,
            config_version=node.config_version,
            config_applied=node.config_applied,
            config=node.config,
            models=[
                NodeModelOut(
                    model=m.model, digest=m.digest, state=m.state, reason=m.reason, updated_at=m.updated_at
                )
                for m in node.models
            ],
        )

    def available_nodes(self) -> list[NodeView]:
        """The ready nodes (not drained, heartbeating), with what routing weighs."""
        views = []
        for node in self.store.list_nodes():
            if self.state(node) != "ready":
                continue
            budget = node.capabilities.get("memory_budget")
            views.append(
                NodeView(
                    id=node.id,
                    name=node.name,
                    memory_budget=budget if isinstance(budget, int) else None,
                    load=node.load,
                    models={m.digest: m.state for m in node.models},
                )
            )
        return views

    def blob(self, digest: str) -> tuple[Path, int]:
        """Where a verified blob (state ok, in the cache) lives, and its size; NotFound else."""
        found = self.store.get_blob(digest)
        if found is None or found.state != "ok" or not self.models.has_blob(digest):
            raise NotFound(
                f"no verified blob {digest} in this server's cache",
                hint="a node fetches only the blobs of the models it is told to load",
            )
        return self.models.blob_path(digest), found.size_bytes

    # -- managing ------------------------------------------------------------------------------

    def drain(self, id_or_name: str, context: Context) -> NodeOut:
        """No new work for the node; what runs there finishes."""
        return self._set_drained(id_or_name, True, context)

    def undrain(self, id_or_name: str, context: Context) -> NodeOut:
        return self._set_drained(id_or_name, False, context)

    def _set_drained(self, id_or_name: str, drained: bool, context: Context) -> NodeOut:
        action = "nodes.drain" if drained else "nodes.undrain"
        with audited(self.store, context, action=action, target=id_or_name) as note:
            node = self._require(id_or_name)
            note.target = node.name
            return self._out(self.store.update_node(node.id, drained=drained))

    def remove(self, id_or_name: str, context: Context) -> NodeOut:
        """Forget the node: its credential stops working at once (the caller fails its work)."""
        with audited(self.store, context, action="nodes.rm", target=id_or_name) as note:
            node = self._require(id_or_name)
            note.target = node.name
            note.detail["node"] = node.id
            return self._out(self.store.remove_node(node.id))

    def assign_model(self, id_or_name: str, name: str, context: Context) -> NodeOut:
        """Add a model to what the node keeps cached and loaded: a newer config_version."""
        with audited(self.store, context, action="nodes.assign", target=id_or_name) as note:
            node = self._require(id_or_name)
            note.target = node.name
            model_name, spec = resolve_spec(self.models, name)  # the worker's own setting offloads
            entry = {
                "model": str(model_name),
                "digest": spec.digest,
                "size_bytes": spec.size_bytes,
                "spec": encode_spec(spec),
            }
            note.detail.update(model=str(model_name), digest=spec.digest)
            with self._config_lock:
                current = self._require(node.id)
                kept = [e for e in current.config.get("models", []) if e.get("model") != entry["model"]]
                updated = self.store.update_node(
                    node.id,
                    config={**current.config, "models": [*kept, entry]},
                    config_version=_next_version(current.config_version),
                )
            note.detail["config_version"] = updated.config_version
            return self._out(updated)

    def unassign_model(self, id_or_name: str, name: str, context: Context) -> NodeOut:
        """Take a model out of the node's config (its blob stays cached there)."""
        with audited(self.store, context, action="nodes.unassign", target=id_or_name) as note:
            node = self._require(id_or_name)
            note.target = node.name
            wanted = str(ModelName.parse(name)) if not name.startswith("sha256:") else name
            note.detail["model"] = wanted
            with self._config_lock:
                current = self._require(node.id)
                entries = current.config.get("models", [])
                kept = [e for e in entries if wanted not in (e.get("model"), e.get("digest"))]
                if len(kept) == len(entries):
                    raise ModelNotFound(
                        f"node {node.name} is not told to load {wanted}",
                        hint=f"`appliance nodes show {node.name}` lists its models",
                    )
                updated = self.store.update_node(
                    node.id,
                    config={**current.config, "models": kept},
                    config_version=_next_version(current.config_version),
                )
            note.detail["config_version"] = updated.config_version
            return self._out(updated)
