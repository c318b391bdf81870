"""The store's cluster tables: join tokens, nodes and what each node holds, on each backend's real
database (tests/store/conftest.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import apsw
import pytest

from appliance.errors import JoinTokenNotFound, NodeExists, NodeNotFound, StoreFailure
from appliance.store.base import JoinToken, Node, NodeModel, Store
from appliance.store.migrations import MIGRATIONS
from appliance.store.sqlite import SqliteStore
from tests.store.conftest import backend, store

__all__ = ["backend", "store"]  # the store fixtures, so each test runs on every backend

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
VERSION = "01M97W4KXF47FX6BWFT0BATK6R"


def node(name: str = "w1", *, token_id: str | None = "t1") -> Node:
    return Node(
        id=f"id-{name}",
        name=name,
        credential_hash=f"hash-{name}",
        config_version=VERSION,
        token_id=token_id,
        capabilities={"memory_budget": 1000},
    )


def test_the_migration_replaces_the_old_placeholder_table(tmp_path: Path) -> None:
    cluster = [migration.name for migration in MIGRATIONS].index("0011_cluster")
    before = SqliteStore(tmp_path / "old.db", migrations=MIGRATIONS[:cluster])
    before.close()
    after = SqliteStore(tmp_path / "old.db")
    assert "0011_cluster" in after.applied_migrations()
    after.close()
    connection = apsw.Connection(str(tmp_path / "old.db"))
    columns = [row[1] for row in connection.execute("PRAGMA table_info(node_model_availability)")]
    connection.close()
    assert columns == ["node_id", "digest", "model", "state", "reason", "updated_at"]


def test_join_tokens_are_listed_and_revoked_once(store: Store) -> None:
    store.create_join_token(JoinToken("t1", "h1", "cli:root", expires_at=None))
    store.create_join_token(JoinToken("t2", "h2", "cli:root", expires_at="2000-01-01T00:00:00.000000Z"))
    assert [token.id for token in store.list_join_tokens()] == ["t1", "t2"]
    revoked = store.revoke_join_token("t1")
    assert revoked.revoked_at is not None
    assert store.revoke_join_token("t1").revoked_at == revoked.revoked_at  # the first time stays
    assert store.get_join_token("t2") == JoinToken(
        "t2", "h2", "cli:root", store.list_join_tokens()[1].created_at, "2000-01-01T00:00:00.000000Z"
    )
    assert store.get_join_token("nope") is None
    with pytest.raises(JoinTokenNotFound):
        store.revoke_join_token("nope")


def test_a_node_joins_once_per_name_and_counts_its_tokens_use(store: Store) -> None:
    store.create_join_token(JoinToken("t1", "h1", "cli:root"))
    store.create_node(node("w1"))
    with pytest.raises(NodeExists, match="w1"):
        store.create_node(replace(node("w1"), id="other", credential_hash="other"))
    store.create_node(node("w2"))
    token = store.get_join_token("t1")
    assert token is not None
    assert token.uses == 2
    assert [found.name for found in store.list_nodes()] == ["w1", "w2"]


def test_a_node_is_found_by_id_name_or_credential(store: Store) -> None:
    added = store.create_node(node("w1", token_id=None))
    assert store.get_node("id-w1") == added
    assert store.get_node("w1") == added
    assert store.find_node("hash-w1") == added
    assert store.get_node("nope") is None
    assert store.find_node("nope") is None


def test_an_update_sets_columns_and_replaces_what_the_node_holds(store: Store) -> None:
    store.create_node(node("w1"))
    held = [
        NodeModel(DIGEST_A, "tiny:latest", "available"),
        NodeModel(DIGEST_B, "b:latest", "failed", "no room"),
    ]
    updated = store.update_node(
        "id-w1",
        models=held,
        drained=True,
        last_heartbeat_at="2026-01-01T00:00:00.000000Z",
        load={"active": 1},
        config={"models": [{"model": "tiny:latest"}]},
        config_version="01M97W4KXF47FX6BWFT0BATK6S",
        config_applied=VERSION,
    )
    assert updated.drained is True
    assert updated.load == {"active": 1}
    assert updated.config == {"models": [{"model": "tiny:latest"}]}
    assert updated.config_applied == VERSION
    assert [(m.model, m.state, m.reason) for m in updated.models] == [
        ("b:latest", "failed", "no room"),
        ("tiny:latest", "available", None),
    ]
    # Another report replaces the list; columns not named stay as they were.
    again = store.update_node("id-w1", models=[NodeModel(DIGEST_A, "tiny:latest", "cached")])
    assert [(m.digest, m.state) for m in again.models] == [(DIGEST_A, "cached")]
    assert again.drained is True
    assert store.update_node("id-w1").models == again.models  # no models given: left alone


def test_bad_input_changes_nothing(store: Store) -> None:
    added = store.create_node(node("w1"))
    with pytest.raises(NodeNotFound):
        store.update_node("nope", drained=True)
    with pytest.raises(ValueError, match="not a node column"):
        store.update_node("id-w1", name="x")  # type: ignore[call-arg]
    with pytest.raises(StoreFailure, match=r"(?i)check"):
        store.update_node(
            "id-w1",
            drained=True,
            models=[NodeModel(DIGEST_A, "m", "bogus")],  # type: ignore[arg-type]
        )
    assert store.get_node("id-w1") == added


def test_removing_a_node_forgets_it_and_what_it_held(store: Store) -> None:
    store.create_node(node("w1"))
    store.update_node("id-w1", models=[NodeModel(DIGEST_A, "tiny:latest", "available")])
    removed = store.remove_node("id-w1")
    assert removed.name == "w1"
    assert store.get_node("w1") is None
    assert store.find_node("hash-w1") is None
    with pytest.raises(NodeNotFound):
        store.remove_node("id-w1")
    assert store.create_node(node("w1")).models == ()
    assert store.get_node("w1").models == ()  # type: ignore[union-attr]
