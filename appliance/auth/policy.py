"""Who may do what: ``decide(actor, action, resource)``, one pure function, and the actions it knows.

Roles, from most to least:

- ``admin``: everything.
- ``user``: infer, list and show models, read their own identity, manage their own API keys, and
  run tasks (seeing and cancelling only their own: the task service checks who owns one);
  pull too where the site grants it (``models.download.allowed_roles``, REQ-MODELS-0107).
- ``node``: a worker, through the cluster's routes only (``cluster.node``): join, heartbeat, take
  work, answer it, fetch blobs (``blobs.read``). Nothing on an admin's or a user's route.

A server that shares the database (an actor of kind ``server``, with its server credential) may
fetch blobs (``blobs.read``) and nothing else, whatever role it is given.

An actor without a role (an anonymous client) may do nothing; the web layer only asks when
auth is on, so loopback without auth keeps working as before.

Imports: identity only.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from appliance.identity import Actor, Role

__all__ = ["ACTIONS", "Action", "Allow", "Decision", "Deny", "Resource", "decide"]

Action = Literal[
    "public",  # no credentials needed: health, the UI's page and assets, the API docs
    "me",  # one's own identity
    "infer",
    "models.read",
    "models.pull",
    "models.manage",  # import, import-dir, bundles, delete, pin, gc, verify, load/unload, copy, create
    "downloads.read",
    "downloads.decide",  # approve/deny/cancel downloads
    "system.read",  # engine status, metrics, host facts
    "preferences.read",
    "preferences.write",
    "audit.read",
    "users.manage",
    "keys.own",  # list/create/revoke API keys; someone else's need admin (see Resource.owner)
    "tasks.run",  # create, follow and cancel tasks; a user reaches only their own
    "cluster.node",  # a worker's routes: heartbeat, work, answers (each checks the node credential)
    "blobs.read",  # a verified blob from the cache: a worker's, or a peer server's (the route checks which)
    "nodes.read",  # list and show nodes and join tokens
    "nodes.manage",  # join tokens, drain, undrain, remove, load and unload models on nodes
    "servers.read",  # list the servers sharing the database
    "providers.read",  # list and show external providers (never a key: no surface reads one back)
    "providers.manage",  # add, change, remove and test external providers
    "mcp.tool.invoke",  # reach the MCP gateway; each tool then needs its own action (appliance.mcp)
]
ACTIONS: tuple[Action, ...] = Action.__args__  # type: ignore[attr-defined]

_GRANTED: dict[Role, frozenset[str]] = {
    "user": frozenset({"me", "infer", "models.read", "keys.own", "tasks.run", "mcp.tool.invoke"}),
    "node": frozenset({"cluster.node", "blobs.read"}),
}


@dataclass(frozen=True)
class Resource:
    """What the action touches, as far as the decision needs it."""

    owner: str | None = None  # the user an API key belongs to (keys.own)
    granted_roles: Collection[Role] = ()  # roles the site lets do this action too (pulls)


@dataclass(frozen=True)
class Allow:
    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Deny:
    reason: str

    def __bool__(self) -> bool:
        return False


Decision = Allow | Deny


def decide(actor: Actor, action: Action, resource: Resource | None = None) -> Decision:
    """Allow or deny, with the reason a denial is shown and audited with."""
    resource = resource or Resource()
    if actor.kind == "server":  # a peer's credential reaches its blob route only
        return Allow() if action in ("public", "blobs.read") else Deny(f"{action} is not for a peer server")
    if action == "public" or actor.role == "admin":
        return Allow()
    if actor.role is None:
        return Deny(f"{actor.label} has no role")
    if action in _GRANTED[actor.role] or actor.role in resource.granted_roles:
        if action == "keys.own" and resource.owner is not None and resource.owner != _user_of(actor):
            return Deny(f"{actor.label} may manage only their own API keys")
        return Allow()
    return Deny(f"{action} needs the admin role; {actor.label} has the {actor.role} role")


def _user_of(actor: Actor) -> str | None:
    return actor.id if actor.kind == "user" else None
