"""``/api/v1/db``: where the running server's store stands, for admins (the UI's Database section).

Migrating and copying stay with the CLI (``appliance db migrate|copy``): they are an operator's
actions on a database, best done with its servers stopped, not requests a server answers.
"""

from __future__ import annotations

from litestar import get
from litestar.datastructures import State
from pydantic import BaseModel

from appliance.runtime import Runtime

__all__ = ["DbStatusOut", "db_status"]


class DbStatusOut(BaseModel):
    backend: str  # sqlite or postgresql
    location: str  # the file's path, or the URL with its password masked
    schema_name: str | None  # the PostgreSQL schema; null for SQLite
    schema_version: str | None  # the last migration applied
    applied: list[str]
    pending: list[str]  # migrations this build has and the database has not
    newer: list[str]  # migrations a newer build applied
    tables: dict[str, int]  # rows per table


@get("/api/v1/db", tags=["system"], sync_to_thread=True)
def db_status(state: State) -> DbStatusOut:
    """The store's backend, location (never a password), schema version, pending migrations and the
    rows of each table."""
    runtime: Runtime = state.runtime
    found = runtime.database_status()
    return DbStatusOut(
        backend=found.backend,
        location=found.location,
        schema_name=found.schema_name,
        schema_version=found.schema_version,
        applied=found.applied,
        pending=found.pending,
        newer=found.newer,
        tables=found.tables,
    )
