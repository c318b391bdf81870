"""The SQLite store: migrations, the registry tables, the audit log and preferences, on real files."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from appliance.errors import DownloadNotFound, DownloadNotPending, ModelExists, ModelNotFound, StoreFailure
from appliance.names import ModelName
from appliance.store.base import AuditEvent, Download, NewArtifact
from appliance.store.migrations import SQLITE_MIGRATIONS, Migration
from appliance.store.sqlite import SqliteStore

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "appliance.db")
    yield opened
    opened.close()


def artifact(
    digest: str = DIGEST_A, filename: str = "m.gguf", fmt: str = "gguf", size: int = 10
) -> NewArtifact:
    return NewArtifact(filename=filename, format=fmt, digest=digest, size_bytes=size, source_uri="file:/x")


def test_migrations_apply_once_and_reopen_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "appliance.db"
    first = SqliteStore(path)
    first.add_artifact(ModelName("m"), artifact(), capabilities={}, actor="t")
    first.close()
    second = SqliteStore(path)
    assert second.applied_migrations() == [migration.name for migration in SQLITE_MIGRATIONS]
    assert second.get_model(ModelName("m")) is not None
    second.close()


def test_a_new_migration_is_applied_on_open(tmp_path: Path) -> None:
    path = tmp_path / "appliance.db"
    SqliteStore(path).close()
    extra = Migration("9999_extra", "CREATE TABLE extra (id INTEGER PRIMARY KEY)")
    reopened = SqliteStore(path, migrations=(*SQLITE_MIGRATIONS, extra))
    assert reopened.applied_migrations()[-1] == "9999_extra"
    reopened.close()


def test_a_failing_migration_leaves_nothing_half_applied(tmp_path: Path) -> None:
    path = tmp_path / "appliance.db"
    SqliteStore(path).close()
    broken = Migration("9999_broken", "CREATE TABLE half (id INTEGER); CREATE TABLE half (id INTEGER);")
    with pytest.raises(StoreFailure):
        SqliteStore(path, migrations=(*SQLITE_MIGRATIONS, broken))
    connection = apsw.Connection(str(path))
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "half" not in tables
    connection.close()


def test_wal_and_foreign_keys_are_on(store: SqliteStore) -> None:
    connection = store._reader()
    assert next(connection.execute("PRAGMA journal_mode"))[0] == "wal"
    assert next(connection.execute("PRAGMA foreign_keys"))[0] == 1


def test_add_artifact_is_idempotent_and_keeps_several_formats(store: SqliteStore) -> None:
    """REQ-MODELS-0103: one logical model may hold several formats."""
    name = ModelName("m", "v1")
    model, added = store.add_artifact(name, artifact(), capabilities={"context_length": 256}, actor="t")
    assert added
    again, added_again = store.add_artifact(name, artifact(), capabilities={}, actor="t")
    assert not added_again
    assert again.artifacts == model.artifacts
    both, _ = store.add_artifact(
        name,
        artifact(DIGEST_B, "model.safetensors", "safetensors", 20),
        capabilities={"dtypes": ["F16"]},
        actor="t",
    )
    assert both.formats == ["gguf", "safetensors"]
    assert both.size_bytes == 30
    assert both.capabilities == {"context_length": 256, "dtypes": ["F16"]}


def test_same_file_with_other_content_is_a_conflict_and_changes_nothing(store: SqliteStore) -> None:
    store.add_artifact(ModelName("m"), artifact(), capabilities={}, actor="t")
    with pytest.raises(ModelExists):
        store.add_artifact(ModelName("m"), artifact(DIGEST_B), capabilities={}, actor="t")
    assert [blob.digest for blob in store.list_blobs()] == [DIGEST_A]


def test_remove_reports_only_blobs_nobody_else_uses(store: SqliteStore) -> None:
    store.add_artifact(ModelName("a"), artifact(DIGEST_A), capabilities={}, actor="t")
    store.add_artifact(ModelName("b"), artifact(DIGEST_A), capabilities={}, actor="t")
    store.add_artifact(ModelName("b"), artifact(DIGEST_B, "other.gguf", size=5), capabilities={}, actor="t")
    first = store.remove_model(ModelName("a"))
    assert first.orphaned_digests == ()
    second = store.remove_model(ModelName("b"))
    assert sorted(second.orphaned_digests) == [DIGEST_A, DIGEST_B]
    assert second.freed_bytes == 15
    assert store.list_models() == []
    store.forget_blobs(second.orphaned_digests)
    assert store.list_blobs() == []
    with pytest.raises(ModelNotFound):
        store.remove_model(ModelName("b"))


def test_pin_and_touch(store: SqliteStore) -> None:
    store.add_artifact(ModelName("m"), artifact(), capabilities={}, actor="t")
    assert store.set_pinned(ModelName("m"), True).pinned
    before = store.get_model(ModelName("m"))
    assert before is not None
    store.touch_model(ModelName("m"))
    after = store.get_model(ModelName("m"))
    assert after is not None
    assert after.last_used_at > before.last_used_at
    with pytest.raises(ModelNotFound):
        store.set_pinned(ModelName("missing"), True)


def test_audit_filters(store: SqliteStore) -> None:
    for index, (actor, action) in enumerate(
        [("cli:a", "models.import"), ("api:b", "models.import"), ("cli:a", "models.delete")]
    ):
        store.append_audit(
            AuditEvent(
                actor=actor,
                action=action,
                target=f"m{index}",
                outcome="ok",
                correlation_id=f"c{index}",
                at=f"2026-01-0{index + 1}T00:00:00.000000Z",
            )
        )
    assert [event.target for event in store.list_audit()] == ["m2", "m1", "m0"]
    assert [event.target for event in store.list_audit(action="models.import")] == ["m1", "m0"]
    assert [event.target for event in store.list_audit(actor="cli:a")] == ["m2", "m0"]
    assert [event.target for event in store.list_audit(since="2026-01-02", until="2026-01-03")] == ["m1"]
    assert len(store.list_audit(limit=1)) == 1


def test_preferences_round_trip(store: SqliteStore) -> None:
    store.set_preference("models.cache.max_bytes", 1000, actor="t")
    store.set_preference("models.download.allowed_sources", ["hf"], actor="t")
    assert store.get_preference("models.cache.max_bytes") == 1000
    assert store.list_preferences() == {
        "models.cache.max_bytes": 1000,
        "models.download.allowed_sources": ["hf"],
    }
    store.set_preference("models.cache.max_bytes", None, actor="t")
    assert store.get_preference("models.cache.max_bytes") is None


def test_two_stores_on_one_file_write_concurrently(tmp_path: Path) -> None:
    """The server and a CLI command share the file; writes wait for each other instead of failing."""
    path = tmp_path / "appliance.db"
    stores = [SqliteStore(path), SqliteStore(path)]
    errors: list[BaseException] = []

    def write(store: SqliteStore, prefix: str) -> None:
        try:
            for index in range(50):
                store.add_artifact(
                    ModelName(f"{prefix}{index}"),
                    artifact(f"sha256:{index:064x}"),
                    capabilities={},
                    actor=prefix,
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(store, f"s{n}-")) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(stores[0].list_models()) == 100
    assert len(stores[0].list_blobs()) == 50  # both wrote the same 50 digests: one blob row each
    for store in stores:
        store.close()


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


def test_a_download_moves_from_a_state_only_once(store: SqliteStore) -> None:
    store.create_download(
        Download(id="d1", ref="https://mirror.lan/m.gguf", state="pending", requested_by="u")
    )
    approved = store.update_download("d1", only_from=("pending",), state="approved", decided_by="admin")
    assert (approved.state, approved.decided_by) == ("approved", "admin")
    with pytest.raises(DownloadNotPending, match="is approved, not pending"):
        store.update_download("d1", only_from=("pending",), state="denied", decided_by="other")
    assert store.get_download("d1").state == "approved"  # type: ignore[union-attr]
    with pytest.raises(DownloadNotFound):
        store.update_download("nope", state="done")


def test_replacing_takes_the_old_file_out_in_the_same_write(store: SqliteStore) -> None:
    name = ModelName("m")
    store.add_artifact(name, artifact(DIGEST_A), capabilities={}, actor="t")
    with pytest.raises(ModelExists, match="a model holds one gguf file"):
        store.add_artifact(
            name, artifact(DIGEST_B, "other.gguf"), capabilities={}, actor="t", sole_format=True
        )
    model, added = store.add_artifact(
        name,
        artifact(DIGEST_B, "other.gguf"),
        capabilities={},
        actor="t",
        replacing=["m.gguf"],
        sole_format=True,
    )
    assert added
    assert [(a.filename, a.digest) for a in model.artifacts] == [("other.gguf", DIGEST_B)]
    store.forget_blobs([DIGEST_A])
    assert [blob.digest for blob in store.list_blobs()] == [DIGEST_B]
