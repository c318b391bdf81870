"""``appliance db``'s work on real databases: the status of a SQLite file and of a PostgreSQL schema
(read, never made or migrated), migrating, and copying a registry the services filled from SQLite
into PostgreSQL: every row, verified, all or nothing, safe to re-run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import apsw
import psycopg
import pytest

from appliance.egress.providers import ProviderService
from appliance.errors import Conflict, InvalidInput, NotFound, SourceNotFound, StoreFailure
from appliance.settings import Settings, StoreSettings
from appliance.store import admin
from appliance.store.base import AuditEvent, InferenceRecord, User
from appliance.store.migrations import MIGRATIONS, Migration
from appliance.store.sqlite import SqliteStore
from tests.store.filled import Filled, fill_registry

NAMES = [migration.name for migration in MIGRATIONS]
FUTURE = Migration("9999_future", "CREATE TABLE future (x INTEGER)", "CREATE TABLE future (x INTEGER)")
PASSWORD_URL = "postgresql://appliance:s3cret-pw@127.0.0.1:1/appliance"


def on_postgres(url: str, data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, store=StoreSettings(url=url))


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, Filled]:
    """A data dir whose SQLite registry holds a row in every table."""
    data = tmp_path / "data"
    return data, fill_registry(data, tmp_path / "work")


# -- status and migrate on SQLite ---------------------------------------------------------------


def test_status_of_a_fresh_sqlite_registry(settings: Settings) -> None:
    assert admin.migrate(settings) == NAMES  # made: the data dir had none
    found = admin.status(settings)
    assert found.backend == "sqlite"
    assert found.location == str(settings.data_dir / "appliance.db")
    assert found.schema_name is None
    assert found.schema_version == NAMES[-1]
    assert (found.applied, found.pending, found.newer) == (NAMES, [], [])
    assert found.tables["models"] == 0
    assert found.tables["registry_generation"] == 1
    assert "schema_migrations" not in found.tables
    assert admin.migrate(settings) == []


def test_status_neither_makes_nor_migrates_a_sqlite_file(settings: Settings) -> None:
    path = settings.data_dir / "appliance.db"
    with pytest.raises(SourceNotFound, match="no SQLite registry") as raised:
        admin.status(settings)
    assert "db migrate" in raised.value.hint
    assert not path.exists()

    settings.data_dir.mkdir()
    SqliteStore(path, migrations=MIGRATIONS[:3]).close()
    found = admin.status(settings)
    assert found.schema_version == NAMES[2]
    assert found.pending == NAMES[3:]
    assert admin.status(settings).pending == NAMES[3:]  # still: status only read
    assert admin.migrate(settings) == NAMES[3:]
    assert admin.status(settings).pending == []


def test_status_names_migrations_a_newer_appliance_applied(settings: Settings) -> None:
    settings.data_dir.mkdir()
    SqliteStore(settings.data_dir / "appliance.db", migrations=(*MIGRATIONS, FUTURE)).close()
    found = admin.status(settings)
    assert found.newer == ["9999_future"]
    assert found.tables["future"] == 0


def test_status_of_a_file_that_is_no_database_says_so(settings: Settings) -> None:
    settings.data_dir.mkdir()
    (settings.data_dir / "appliance.db").write_bytes(b"not a database, only text" * 100)
    with pytest.raises(StoreFailure, match="cannot read the SQLite registry"):
        admin.status(settings)


# -- status and migrate on PostgreSQL -----------------------------------------------------------


def test_status_of_a_postgres_schema_reads_only(postgres_url: str, tmp_path: Path) -> None:
    settings = on_postgres(postgres_url, tmp_path)
    found = admin.status(settings)
    assert found.backend == "postgresql"
    assert found.location == postgres_url
    assert found.schema_name is not None
    assert found.schema_name.startswith("test_")
    assert (found.schema_version, found.applied, found.pending, found.tables) == (None, [], NAMES, {})
    assert admin.status(settings).tables == {}  # nothing made

    assert admin.migrate(settings) == NAMES
    found = admin.status(settings)
    assert (found.schema_version, found.pending) == (NAMES[-1], [])
    assert found.tables["models"] == 0
    assert found.tables["registry_generation"] == 1
    assert admin.migrate(settings) == []


def test_status_of_a_missing_schema_says_so(postgres_url: str, tmp_path: Path) -> None:
    url = postgres_url.replace("search_path%3Dtest_", "search_path%3Dmissing_")
    with pytest.raises(NotFound, match="no schema on its search_path"):
        admin.status(on_postgres(url, tmp_path))


def test_an_unreachable_database_fails_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(StoreFailure) as raised:
        admin.status(on_postgres(PASSWORD_URL, tmp_path))
    assert "postgresql://appliance:***@127.0.0.1:1/appliance" in raised.value.message
    assert "s3cret-pw" not in f"{raised.value.message} {raised.value.hint}"


# -- copy ---------------------------------------------------------------------------------------


def test_a_copy_carries_every_row_and_the_target_serves_the_same_registry(
    filled: tuple[Path, Filled], postgres_url: str
) -> None:
    from appliance.store.postgres import PostgresStore

    data, fill = filled
    source = admin.status(Settings(data_dir=data))
    seen: list[tuple[str, int, int]] = []
    report = admin.copy(data / "appliance.db", postgres_url, progress=lambda *sent: seen.append(sent))

    carried = {name: rows for name, rows in source.tables.items() if name not in report.left_behind}
    assert {table.name: table.rows for table in report.tables} == carried
    assert all(table.rows > 0 for table in report.tables)  # every table had something to copy
    for table in report.tables:
        # The target's migration made its own registry_generation row: the counter is its own.
        assert table.copied == (0 if table.name == "registry_generation" else table.rows), table.name
    order = [table.name for table in report.tables]
    for parent, child in [
        ("models", "model_versions"),
        ("model_versions", "model_artifacts"),
        ("blobs", "model_artifacts"),
        ("users", "api_keys"),
        ("users", "login_sessions"),
        ("nodes", "node_model_availability"),
    ]:
        assert order.index(parent) < order.index(child)
    assert ("audit_log", source.tables["audit_log"], source.tables["audit_log"]) in seen
    assert report.target == postgres_url
    assert (
        report.blobs_digest
        == "sha256:" + hashlib.sha256("\n".join(sorted(fill.models.values())).encode()).hexdigest()
    )

    copied = admin.status(on_postgres(postgres_url, data))
    assert (copied.tables, copied.pending) == (source.tables, [])
    store = PostgresStore(postgres_url)
    try:
        assert {str(model.name): model.artifacts[0].digest for model in store.list_models()} == fill.models
        assert store.get_preference("models.cache.evict_policy") == "none"
        key = store.find_api_key(hashlib.sha256(fill.user_key.encode()).hexdigest())
        assert key is not None
        assert key.user_name == "alice"
        assert {user.name: user.role for user in store.list_users()} == {"root": "admin", "alice": "user"}
        # The provider's key moved as its ciphertext: the source data dir's key file still opens it.
        assert store.provider_ciphertext("remote") != fill.provider_key.encode()
        assert ProviderService(on_postgres(postgres_url, data), store).key("remote") == fill.provider_key
        # The identity columns' sequences moved past the copied ids: new rows get new ones.
        copied_ids = {event.id for event in store.list_audit(limit=1000)}
        added = store.append_audit(AuditEvent("cli:test", "db.check", "", "ok", "c2"))
        assert added.id is not None
        assert added.id > max(i for i in copied_ids if i is not None)
        store.append_inference(
            InferenceRecord("tiny:latest", "/v1/x", "local", "local", "r", "ok", 1, 1, 1, "c3")
        )
        assert len(store.list_inference()) == 2
    finally:
        store.close()


def test_a_second_copy_adds_nothing(filled: tuple[Path, Filled], postgres_url: str) -> None:
    data, _ = filled
    first = admin.copy(data / "appliance.db", postgres_url)
    again = admin.copy(data / "appliance.db", postgres_url)
    assert again.copied == 0
    assert all(table.already == table.rows for table in again.tables)
    assert (again.blobs_digest, again.artifacts_digest) == (first.blobs_digest, first.artifacts_digest)
    assert (
        admin.status(on_postgres(postgres_url, data)).tables == admin.status(Settings(data_dir=data)).tables
    )


def test_a_target_holding_other_rows_for_the_same_keys_fails_and_keeps_nothing(
    filled: tuple[Path, Filled], postgres_url: str
) -> None:
    from appliance.store.postgres import PostgresStore

    data, _ = filled
    target = PostgresStore(postgres_url)
    try:
        target.create_user(User("alice", "admin", None))  # the source's alice is a user
    finally:
        target.close()
    before = admin.status(on_postgres(postgres_url, data)).tables
    with pytest.raises(Conflict, match="table users differs from the source") as raised:
        admin.copy(data / "appliance.db", postgres_url)
    assert "empty database" in raised.value.hint
    assert admin.status(on_postgres(postgres_url, data)).tables == before  # not a row kept
    assert before["models"] == 0


def test_a_target_holding_more_rows_fails_and_keeps_nothing(
    filled: tuple[Path, Filled], postgres_url: str
) -> None:
    from appliance.store.postgres import PostgresStore

    data, _ = filled
    target = PostgresStore(postgres_url)
    try:
        target.create_user(User("zed", "user", None))
    finally:
        target.close()
    with pytest.raises(Conflict, match="table users would hold 3 rows, the source's 2"):
        admin.copy(data / "appliance.db", postgres_url)
    assert admin.status(on_postgres(postgres_url, data)).tables["models"] == 0


@pytest.mark.parametrize(
    ("migrations", "message"),
    [
        (MIGRATIONS[:5], "behind this appliance's schema"),
        ((*MIGRATIONS, FUTURE), "newer appliance"),
    ],
    ids=["older", "newer"],
)
def test_a_source_at_another_schema_is_refused_before_the_target_is_touched(
    tmp_path: Path, postgres_url: str, migrations: tuple[Migration, ...], message: str
) -> None:
    source = tmp_path / "old.db"
    SqliteStore(source, migrations=migrations).close()
    with pytest.raises(InvalidInput, match=message):
        admin.copy(source, postgres_url)
    assert admin.status(on_postgres(postgres_url, tmp_path)).applied == []  # not even migrated


def test_a_missing_source_is_refused(tmp_path: Path, postgres_url: str) -> None:
    with pytest.raises(SourceNotFound, match="no SQLite registry"):
        admin.copy(tmp_path / "nothing.db", postgres_url)


def test_an_unreachable_target_fails_without_its_password(filled: tuple[Path, Filled]) -> None:
    data, _ = filled
    with pytest.raises(StoreFailure) as raised:
        admin.copy(data / "appliance.db", PASSWORD_URL)
    assert "s3cret-pw" not in f"{raised.value.message} {raised.value.hint}"
    assert "127.0.0.1" in raised.value.message


def test_digests_that_differ_after_a_copy_are_refused(filled: tuple[Path, Filled], postgres_url: str) -> None:
    """The digests are checked on their own too (the rows' check already covers them)."""
    data, _ = filled
    admin.copy(data / "appliance.db", postgres_url)
    with psycopg.connect(postgres_url) as connection:
        connection.execute(
            "DELETE FROM model_artifacts WHERE filename = (SELECT min(filename) FROM model_artifacts)"
        )
        with (
            admin._sqlite(data / "appliance.db") as db,
            pytest.raises(Conflict, match="digests of model_artifacts"),
        ):
            admin._check_digests(db, connection, postgres_url)
        connection.rollback()


def test_a_live_servers_file_is_copied_as_one_snapshot(
    filled: tuple[Path, Filled], postgres_url: str
) -> None:
    """A write in progress (not committed) neither blocks the copy nor goes with it."""
    data, _ = filled
    writer = apsw.Connection(str(data / "appliance.db"))
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO preferences VALUES ('engine.context_length', '8192', 'now', 'cli:test')")
        report = admin.copy(data / "appliance.db", postgres_url)
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert {table.name: table.copied for table in report.tables}["preferences"] == 1


def test_a_value_postgresql_refuses_names_its_table_and_keeps_nothing(
    filled: tuple[Path, Filled], postgres_url: str
) -> None:
    data, _ = filled
    writer = apsw.Connection(str(data / "appliance.db"))
    try:
        writer.execute("UPDATE inference_requests SET prompt_tokens = 'many'")  # SQLite lets it in
    finally:
        writer.close()
    with pytest.raises(InvalidInput, match="holds a value in inference_requests that PostgreSQL refuses"):
        admin.copy(data / "appliance.db", postgres_url)
    assert admin.status(on_postgres(postgres_url, data)).tables["models"] == 0
