"""What only the SQLite store does: WAL and foreign keys, clear errors for a file it cannot open,
and several processes creating one new file. What every backend does is in test_contract.py."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import StoreFailure
from appliance.store.sqlite import SqliteStore


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "appliance.db")
    yield opened
    opened.close()


def test_wal_and_foreign_keys_are_on(sqlite_store: SqliteStore) -> None:
    connection = sqlite_store._reader()
    assert next(connection.execute("PRAGMA journal_mode"))[0] == "wal"
    assert next(connection.execute("PRAGMA foreign_keys"))[0] == 1


def test_an_unopenable_database_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "appliance.db"
    directory.mkdir()
    with pytest.raises(StoreFailure, match="registry database"):
        SqliteStore(directory)


def _open_and_write(path: str, start: Any) -> None:
    start.wait()
    store = SqliteStore(Path(path))
    store.set_preference("opened", True, actor="test")
    store.close()


def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    # Switching a new file to WAL needs an exclusive lock that SQLite does not wait for.
    context = multiprocessing.get_context("spawn")
    for attempt in range(8):
        path = str(tmp_path / f"fresh-{attempt}.db")
        start = context.Barrier(3)
        processes = [context.Process(target=_open_and_write, args=(path, start)) for _ in range(3)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [process.exitcode for process in processes] == [0, 0, 0]
