"""Who is acting: one ``Actor`` type for every caller (a user, an API key, a node, a server that
shares the database, a task, the CLI, or an anonymous client on loopback), built once where a
request or command enters and carried in its audit ``Context``. Policy
(``appliance.auth.policy.decide``) reads its role.

Its ``label`` is the text audit rows and download rows store: ``api:127.0.0.1`` for an
anonymous API client, ``cli:root`` for the CLI, ``<kind>:<id>`` for the rest.

Imports: the standard library only.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["ROLES", "Actor", "ActorKind", "Role", "TaskScope"]

ActorKind = Literal["user", "key", "node", "server", "task", "cli", "anonymous"]
Role = Literal["admin", "user", "node"]
ROLES: tuple[Role, ...] = get_args(Role)

# An anonymous client is only ever an API caller (the CLI names its user), hence its prefix.
_PREFIX = {"anonymous": "api"}
_KINDS = {_PREFIX.get(kind, kind): kind for kind in get_args(ActorKind)}


@dataclass(frozen=True)
class Actor:
    id: str
    kind: ActorKind
    role: Role | None = None

    @property
    def label(self) -> str:
        return f"{_PREFIX.get(self.kind, self.kind)}:{self.id}"

    @classmethod
    def cli(cls) -> Actor:
        """Whoever runs the command on this machine: they own the data dir, hence admin."""
        return cls(id=getpass.getuser(), kind="cli", role="admin")

    @classmethod
    def client(cls, address: str) -> Actor:
        """An API caller without credentials (loopback, where auth is optional), by its address."""
        return cls(id=address, kind="anonymous")

    @classmethod
    def from_label(cls, label: str) -> Actor:
        """The actor a stored label names; a label of no known kind is an internal task's."""
        prefix, _, rest = label.partition(":")
        kind = _KINDS.get(prefix)
        if kind is None or not rest:
            return cls(id=label, kind="task")
        return cls(id=rest, kind=kind)


@dataclass(frozen=True)
class TaskScope:
    """The job a forwarded call came from, as its forwarder vouched for it: the task, its run (the
    attempt, "1" for the first) and the job (an id the forwarder made when the job started). The
    MCP gateway refuses a call whose own ids do not match these."""

    task_id: str
    run_id: str
    job_id: str
