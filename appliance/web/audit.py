"""``/api/v1/audit``: the audit log, newest first, filtered by action, actor and time.

Imports: the audit service (``AuditService``), never the store.
"""

from __future__ import annotations

from litestar import Controller, get
from litestar.params import Parameter

from appliance.audit import AuditOut, AuditService
from appliance.queries import parse_timestamp

__all__ = ["AuditController"]


class AuditController(Controller):
    path = "/api/v1/audit"
    tags = ["audit"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/", sync_to_thread=True)
    def list_audit(
        self,
        audit: AuditService,
        action: str | None = None,
        actor: str | None = None,
        since: str | None = Parameter(default=None, description="ISO 8601 UTC, inclusive"),
        until: str | None = Parameter(default=None, description="ISO 8601 UTC, exclusive"),
        limit: int = Parameter(default=100, ge=1, le=10_000),
    ) -> list[AuditOut]:
        since, until = (None if text is None else parse_timestamp(text) for text in (since, until))
        return audit.list_events(action=action, actor=actor, since=since, until=until, limit=limit)
