"""The audit trail: every mutation is recorded through ``audited`` (or ``record``), nowhere else.

Each event says who (``actor``), what (``action``, ``target``), how it ended (``outcome``),
how many bytes and how long, and carries the correlation id of the request or command that
caused it, so one CLI command or API call can be followed through every row it wrote.
"""

from __future__ import annotations

import getpass
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from appliance.errors import ApplianceError
from appliance.store.base import AuditEvent, Store

__all__ = ["AuditNote", "AuditOut", "Context", "audited", "record"]


@dataclass(frozen=True)
class Context:
    """Who is acting, and the id that ties together everything one command or request does."""

    actor: str
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def cli(cls) -> Context:
        return cls(actor=f"cli:{getpass.getuser()}")


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
