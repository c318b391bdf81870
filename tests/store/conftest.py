"""The store fixtures: each store backend at a fresh location (SQLite: a file of the test's own;
PostgreSQL: a schema of the test's own, tests/postgres.py). A backend added later adds a param."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import apsw
import psycopg
import pytest

from appliance.settings import Settings, StoreSettings
from appliance.store.base import Store
from appliance.store.factory import open_store
from appliance.store.migrations import MIGRATIONS, Migration
from appliance.store.postgres import PostgresStore
from appliance.store.sqlite import SqliteStore
from tests.postgres import fresh_schema


class Backend(Protocol):
    """One backend's database, fresh for each test, reached the way the contract tests need."""

    settings: Settings  # whose store.url names the database

    def open(self, *, migrations: Sequence[Migration] = MIGRATIONS) -> Store:
        """Another store on the same database (the factory only opens the built-in migrations)."""
        ...

    def tables(self) -> set[str]:
        """The tables as the database itself lists them, past the store."""
        ...


class SqliteBackend:
    """A SQLite file of its own, named by ``store.url`` as a user would."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "appliance.db"
        self.settings = Settings(
            data_dir=tmp_path / "data", store=StoreSettings(url=f"sqlite:///{self.path}")
        )

    def open(self, *, migrations: Sequence[Migration] = MIGRATIONS) -> Store:
        return SqliteStore(self.path, migrations=migrations)

    def tables(self) -> set[str]:
        connection = apsw.Connection(str(self.path))
        try:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {row[0] for row in rows}
        finally:
            connection.close()


class PostgresBackend:
    """A schema of its own in the test server's database, named by ``store.url``'s search_path."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.url = url
        self.settings = Settings(data_dir=tmp_path / "data", store=StoreSettings(url=url))

    def open(self, *, migrations: Sequence[Migration] = MIGRATIONS) -> Store:
        return PostgresStore(self.url, migrations=migrations)

    def tables(self) -> set[str]:
        with psycopg.connect(self.url) as connection:
            rows = connection.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            )
            return {row[0] for row in rows}


def _sqlite(tmp_path: Path, _: ExitStack) -> Backend:
    return SqliteBackend(tmp_path)


def _postgres(tmp_path: Path, cleanup: ExitStack) -> Backend:
    return PostgresBackend(tmp_path, cleanup.enter_context(fresh_schema()))


BACKENDS: dict[str, Callable[[Path, ExitStack], Backend]] = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with ExitStack() as cleanup:
        yield BACKENDS[request.param](tmp_path, cleanup)


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    opened = open_store(backend.settings)
    yield opened
    opened.close()
