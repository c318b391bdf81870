"""The audit trail: every mutation is recorded through ``audited`` (or ``record``), nowhere else.

Each event says who (``actor``), what (``action``, ``target``), how it ended (``outcome``),
how many bytes and how long, and carries the correlation id of the request or command that
caused it, so one CLI command or API call can be followed through every row it wrote.
``AuditService`` reads the log back.

Imports: the store (its protocol and row types), errors and identity.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from appliance.errors import ApplianceError
from appliance.identity import Actor
from appliance.store.base import AuditEvent, Store

__all__ = ["AuditNote", "AuditOut", "AuditService", "Context", "audited", "record"]


@dataclass(frozen=True, init=False)
class Context:
    """Who is acting (``who``; ``actor`` is its label as rows store it), and the id that ties
    together everything one command or request does."""

    actor: str
    correlation_id: str
    who: Actor

    def __init__(self, actor: Actor | str, correlation_id: str | None = None) -> None:
        who = actor if isinstance(actor, Actor) else Actor.from_label(actor)
        object.__setattr__(self, "actor", actor.label if isinstance(actor, Actor) else actor)
        object.__setattr__(self, "correlation_id", correlation_id or uuid.uuid4().hex)
        object.__setattr__(self, "who", who)

    @classmethod
    def cli(cls) -> Context:
        return cls(Actor.cli())


class AuditOut(BaseModel):
    """An audit event as the API and ``--json`` show it."""

    id: int
    at: str
    actor: str
    action: str
    target: str
    outcome: str
    bytes: int | None
    duration_ms: int | None
    correlation_id: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, event: AuditEvent) -> AuditOut:
        return cls(**{**event.__dict__, "id": event.id or 0})


@dataclass
class AuditNote:
    """Filled in by the audited block: what it touched, and whether it succeeded."""

    target: str
    bytes: int | None = None
    outcome: Literal["ok", "error"] = "ok"
    detail: dict[str, Any] = field(default_factory=dict)


class AuditService:
    """Reading the audit log, for the API and the CLI."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list_events(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
    ) -> list[AuditOut]:
        """Events newest first; ``since`` inclusive, ``until`` exclusive (stored UTC timestamps)."""
        events = self.store.list_audit(action=action, actor=actor, since=since, until=until, limit=limit)
        return [AuditOut.of(event) for event in events]


def record(
    store: Store,
    context: Context,
    *,
    action: str,
    note: AuditNote,
    duration_ms: int | None = None,
) -> AuditEvent:
    return store.append_audit(
        AuditEvent(
            actor=context.actor,
            action=action,
            target=note.target,
            outcome=note.outcome,
            correlation_id=context.correlation_id,
            bytes=note.bytes,
            duration_ms=duration_ms,
            detail=note.detail,
        )
    )


@contextmanager
def audited(store: Store, context: Context, *, action: str, target: str) -> Iterator[AuditNote]:
    """Time the block and record it; an exception is recorded as an error and re-raised."""
    note = AuditNote(target=target)
    started = time.monotonic()
    try:
        yield note
    except Exception as exc:
        note.outcome = "error"
        code = exc.code if isinstance(exc, ApplianceError) else "internal_error"
        note.detail.update(error=code, message=str(exc))
        record(store, context, action=action, note=note, duration_ms=_elapsed_ms(started))
        raise
    record(store, context, action=action, note=note, duration_ms=_elapsed_ms(started))


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
