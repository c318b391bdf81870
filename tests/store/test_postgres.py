"""What only the PostgreSQL store does: several stores (servers) on one schema claim, lock, notify,
add and migrate without stepping on each other; a wrong URL is a clear error without the password.
What every backend does is in test_contract.py (and the other backend-parametrised files)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import psycopg
import pytest

from appliance.errors import DiskFull, NodeExists, StoreFailure, UserExists
from appliance.names import ModelName
from appliance.store.base import NewArtifact, Node, Task, User
from appliance.store.migrations import MIGRATIONS, Migration
from appliance.store.postgres import AdvisoryLocks, NotifyFeed, PostgresStore, display_url
from tests.postgres import SERVER_URL

LEASE = "2099-01-01T00:00:00.000000Z"


@pytest.fixture
def stores(postgres_url: str) -> Iterator[list[PostgresStore]]:
    """Two stores on one schema, as two servers would open them."""
    opened = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    yield opened
    for store in opened:
        store.close()


def _in_threads(*targets: Callable[[], Any]) -> list[BaseException]:
    """Run each target in a thread of its own, started together; the errors they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def run(target: Callable[[], Any]) -> None:
        start.wait()
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_servers_claim_every_task_exactly_once(stores: list[PostgresStore]) -> None:
    for n in range(200):
        stores[n % 2].create_task(
            Task(id=f"t{n:03}", mode="script", text="true", model=None, state="queued", actor="u")
        )
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all(store: PostgresStore, owner: str) -> None:
        while (found := store.claim_task(owner=owner, lease_expires_at=LEASE)) is not None:
            with lock:
                claimed.append(found.id)

    workers = [
        partial(claim_all, store, f"{n}-{thread}") for n, store in enumerate(stores) for thread in range(2)
    ]
    assert _in_threads(*workers) == []
    assert sorted(claimed) == [f"t{n:03}" for n in range(200)]
    assert {task.attempts for task in stores[0].list_tasks(limit=500)} == {1}


def test_an_idempotency_key_adds_one_task_when_two_servers_add_it_at_once(
    stores: list[PostgresStore],
) -> None:
    results: list[tuple[Task, bool]] = []

    def add(store: PostgresStore, task_id: str) -> None:
        task = Task(id=task_id, mode="script", text="true", model=None, state="queued", actor="u")
        results.append(store.create_task(Task(**{**task.__dict__, "idempotency_key": "k"})))

    assert _in_threads(*(partial(add, stores[n % 2], f"t{n}") for n in range(6))) == []
    assert sorted(added for _, added in results) == [False] * 5 + [True]
    assert len({task.id for task, _ in results}) == 1
    assert len(stores[0].list_tasks()) == 1


def test_a_name_taken_on_one_server_is_taken_on_the_other(stores: list[PostgresStore]) -> None:
    ann = User(name="ann", role="user", password_hash=None)
    errors = _in_threads(*(partial(stores[n % 2].create_user, ann) for n in range(4)))
    assert len(errors) == 3
    assert all(isinstance(error, UserExists) for error in errors)
    node = Node(id="n1", name="gpu-1", credential_hash="a" * 64, config_version="01")
    stores[0].create_node(node)
    with pytest.raises(NodeExists, match="'gpu-1' has already joined"):
        stores[1].create_node(Node(id="n2", name="gpu-1", credential_hash="b" * 64, config_version="01"))


def test_two_servers_adding_the_same_model_at_once_both_succeed(stores: list[PostgresStore]) -> None:
    artifact = NewArtifact("m.gguf", "gguf", "sha256:" + "a" * 64, 10, "file:/x")
    results: list[bool] = []

    def add(store: PostgresStore) -> None:
        results.append(store.add_artifact(ModelName("m"), artifact, capabilities={}, actor="t")[1])

    assert _in_threads(*(partial(add, stores[n % 2]) for n in range(6))) == []
    assert sorted(results) == [False] * 5 + [True]
    assert [model.name for model in stores[1].list_models()] == [ModelName("m")]


def test_a_write_on_one_server_wakes_the_feed_of_the_other(stores: list[PostgresStore]) -> None:
    feed = stores[1].change_feed()
    seen = feed.current("preferences")
    started = time.monotonic()
    stores[0].set_preference("models.cache.max_bytes", 1000, actor="t")
    assert feed.wait("preferences", seen, timeout=1.0) != seen
    assert time.monotonic() - started < 1.0
    # A topic nothing wrote to stays where it was.
    assert feed.wait("downloads", feed.current("downloads"), timeout=0.2) == feed.current("downloads")


def test_the_feed_listens_again_after_its_connection_is_cut(stores: list[PostgresStore]) -> None:
    feed = stores[1].change_feed()
    with psycopg.connect(stores[0].url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%'"
            " AND query LIKE %s",
            (f"%{stores[1]._channel}%",),
        )
    seen = feed.current("tasks")
    deadline = time.monotonic() + 10
    while feed.current("tasks") == seen and time.monotonic() < deadline:
        stores[0].create_task(
            Task(
                id=f"t{time.monotonic_ns()}",
                mode="script",
                text="true",
                model=None,
                state="queued",
                actor="u",
            )
        )
        feed.wait("tasks", seen, timeout=0.5)
    assert feed.current("tasks") != seen


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from appliance.store.postgres import PostgresStore
    store = PostgresStore(sys.argv[1])
    with store.shared_locks().hold("pull:m", blocking=True):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_lock_one_server_holds_is_not_taken_by_another_and_is_freed_when_it_dies(
    stores: list[PostgresStore],
) -> None:
    locks = [store.shared_locks() for store in stores]
    assert locks[0] is not None
    assert locks[1] is not None
    with locks[0].hold("pull:m", blocking=False) as taken:
        assert taken
        with locks[1].hold("pull:m", blocking=False) as again:
            assert not again
        with locks[1].hold("pull:other", blocking=False) as other:
            assert other
    with locks[1].hold("pull:m", blocking=False) as after:
        assert after

    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, stores[0].url], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            with locks[1].hold("pull:m", blocking=False) as taken:
                assert not taken
        finally:
            holder.kill()
    deadline = time.monotonic() + 10
    while True:
        with locks[1].hold("pull:m", blocking=False) as taken:
            if taken or time.monotonic() > deadline:
                break
        time.sleep(0.05)
    assert taken


def test_locks_of_stores_in_other_schemas_never_meet(postgres_url: str) -> None:
    from tests.postgres import fresh_schema

    with fresh_schema() as other_url:
        first, second = PostgresStore(postgres_url), PostgresStore(other_url)
        try:
            first_locks, second_locks = first.shared_locks(), second.shared_locks()
            assert first_locks is not None
            assert second_locks is not None
            with (
                first_locks.hold("pull:m", blocking=True),
                second_locks.hold("pull:m", blocking=False) as taken,
            ):
                assert taken
        finally:
            first.close()
            second.close()


def test_servers_starting_together_on_a_new_schema_all_migrate_it(postgres_url: str) -> None:
    opened: list[PostgresStore] = []
    assert _in_threads(*[lambda: opened.append(PostgresStore(postgres_url))] * 4) == []
    try:
        names = [migration.name for migration in MIGRATIONS]
        assert all(store.applied_migrations() == names for store in opened)
    finally:
        for store in opened:
            store.close()


def test_a_database_out_of_disk_space_is_disk_full(postgres_url: str) -> None:
    full = Migration(
        "9999_full",
        sqlite="",
        postgres="DO $$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$",
    )
    with pytest.raises(DiskFull, match="is full"):
        PostgresStore(postgres_url, migrations=(*MIGRATIONS, full))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://appliance:s3cret@127.0.0.1:1/test", "Connection refused"),
        (SERVER_URL.replace("/test", "/no_such_database"), "does not exist"),
        # Where the reason would hold the password (here: as the database's name too), it is masked.
        ("postgresql://postgres:s3cret@127.0.0.1:5432/s3cret", 'database "***" does not exist'),
    ],
)
def test_a_database_it_cannot_reach_is_a_clear_error_without_the_password(url: str, reason: str) -> None:
    from tests.postgres import unreachable_reason

    if unreachable_reason() is not None:
        pytest.skip(unreachable_reason() or "")
    started = time.monotonic()
    with pytest.raises(StoreFailure) as raised:
        PostgresStore(url)
    assert time.monotonic() - started < 5
    shown, _, detail = raised.value.message.partition(" failed: ")
    assert shown == f"the PostgreSQL database {display_url(url)}"
    assert reason in detail
    assert "s3cret" not in detail + raised.value.hint
    assert "APPLIANCE_STORE__URL" in raised.value.hint


UNREACHABLE = "postgresql://appliance:s3cret@127.0.0.1:1/appliance"


def test_a_lock_on_a_database_it_cannot_reach_is_a_clear_error() -> None:
    locks = AdvisoryLocks(UNREACHABLE, schema="public")
    pattern = r"appliance:\*\*\*@127\.0\.0\.1:1/appliance failed"
    with pytest.raises(StoreFailure, match=pattern) as raised, locks.hold("pull:m", blocking=False):
        pass
    assert "s3cret" not in raised.value.message


def test_a_feed_that_cannot_listen_says_so_once_and_keeps_trying(caplog: pytest.LogCaptureFixture) -> None:
    feed = NotifyFeed(UNREACHABLE, channel="appliance_test")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="appliance.store.postgres"):
        feed.start()
        assert time.monotonic() - started < 5
        assert feed.wait("tasks", 0, timeout=0.5) == 0  # nothing moves it; callers still poll
        feed.close()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "the PostgreSQL database postgresql://appliance:***@127.0.0.1:1/appliance failed" in warnings[0]
    assert "s3cret" not in warnings[0]


def test_a_search_path_naming_no_schema_is_a_clear_error(postgres_url: str) -> None:
    with pytest.raises(StoreFailure, match="no schema to keep tables in") as raised:
        PostgresStore(postgres_url.replace("test_", "missing_"))
    assert "search_path" in raised.value.hint


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ann:s3cret@db.lan:5432/app", "postgresql://ann:***@db.lan:5432/app"),
        (
            "postgres://db.lan/app?user=ann&password=s3cret&sslmode=require",
            "postgres://db.lan/app?user=ann&password=***&sslmode=require",
        ),
        ("postgresql://ann@db.lan/app", "postgresql://ann@db.lan/app"),
    ],
)
def test_the_url_shown_never_holds_the_password(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_the_store_names_its_schema_and_hands_out_a_transaction(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    try:
        assert store.schema.startswith("test_")
        assert store.display_url == postgres_url
        with store.connection() as connection:
            connection.execute("INSERT INTO preferences VALUES ('k', '1', 'now', 't')")
        assert store.get_preference("k") == 1

        def delete_then_fail() -> None:
            with store.connection() as connection:
                connection.execute("DELETE FROM preferences")
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            delete_then_fail()
        assert store.get_preference("k") == 1
    finally:
        store.close()


def test_a_connection_the_server_dropped_is_replaced_without_an_error(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)

    def drop_the_pooled_connection() -> None:
        with store.connection() as connection:
            row = connection.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))

    try:
        store.set_preference("k", 1, actor="t")
        drop_the_pooled_connection()
        assert store.get_preference("k") == 1  # a read
        drop_the_pooled_connection()
        store.set_preference("k", 2, actor="t")  # a write
        assert store.get_preference("k") == 2
    finally:
        store.close()
