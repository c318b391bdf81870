"""What every store backend does, whichever one ``store.url`` picks: the registry, the audit log,
downloads, preferences and migrations, on a real database per backend (see conftest.py)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from appliance.errors import (
    ApiKeyNotFound,
    DownloadNotFound,
    DownloadNotPending,
    ModelExists,
    ModelNotFound,
    StoreFailure,
    UserExists,
    UserNotFound,
)
from appliance.names import ModelName
from appliance.store.base import (
    ApiKey,
    AuditEvent,
    Download,
    InferenceRecord,
    LoginSession,
    NewArtifact,
    Server,
    Store,
    User,
)
from appliance.store.migrations import MIGRATIONS, Migration
from tests.store.conftest import Backend

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64

# The SQL of migrations already applied somewhere: an edit would never reach those databases.
APPLIED_SQLITE_SQL = {
    "0001_registry": "33a00b28baef2dbe144ad267efa95953945ebb857a160879a04a36c7310ce41a",
    "0002_inference_requests": "85907b36f3c91df4f79a193cb41b8651c1286359a3d5c90100f74637627f5166",
    "0003_download_progress": "123ce6c80bf104bead1cf6dade58f881040b009f6287fd436cb3129b8201d6e5",
    "0004_download_queued_state": "b22e10b379b997d7e7cb426d28fa9bdafba806fcc076601773d9382b0c504764",
    "0005_blob_link_stat": "6c0eee7f80ac5ea0151eb10c057f6673588c8951fb3dc921930d916bb0ed763a",
    "0006_download_interrupted_state": "34d47da49c1b580e5c3e8278787efe6354243779796799744fded89cbc9bac27",
    "0007_users_and_api_keys": "14d1ac7e42cc6ec12ce07390b2fffe5396d74f16c679783ffdf66f07092c18ea",
    "0008_login_sessions": "33ae288cd13ccdbb3fafae2db35f638a1d803980b4bdc256d05069cf3331b5fc",
    "0009_registry_generation": "1c05e45ef2f0b5641f7367505040ead9041f117c6ca771502be7c925a6270e48",
}


def artifact(
    digest: str = DIGEST_A, filename: str = "m.gguf", fmt: str = "gguf", size: int = 10
) -> NewArtifact:
    return NewArtifact(filename=filename, format=fmt, digest=digest, size_bytes=size, source_uri="file:/x")


def test_applied_migrations_are_never_edited_renamed_or_reordered() -> None:
    """New migrations go after these; the ones that shipped keep their names, order and SQL."""
    shipped = [
        (migration.name, hashlib.sha256(migration.sqlite.encode()).hexdigest())
        for migration in MIGRATIONS[: len(APPLIED_SQLITE_SQL)]
    ]
    assert shipped == list(APPLIED_SQLITE_SQL.items())
    names = [migration.name for migration in MIGRATIONS]
    assert len(set(names)) == len(names)


def test_migrations_apply_once_and_reopen_cleanly(backend: Backend) -> None:
    first = backend.open()
    first.add_artifact(ModelName("m"), artifact(), capabilities={}, actor="t")
    first.close()
    second = backend.open()
    assert second.applied_migrations() == [migration.name for migration in MIGRATIONS]
    assert second.get_model(ModelName("m")) is not None
    second.close()


def test_a_new_migration_is_applied_on_open(backend: Backend) -> None:
    backend.open().close()
    extra = Migration(
        "9999_extra",
        sqlite="CREATE TABLE extra (id INTEGER PRIMARY KEY)",
        postgres="CREATE TABLE extra (id BIGINT PRIMARY KEY)",
    )
    reopened = backend.open(migrations=(*MIGRATIONS, extra))
    assert reopened.applied_migrations()[-1] == "9999_extra"
    assert "extra" in backend.tables()
    reopened.close()


def test_a_failing_migration_leaves_nothing_half_applied(backend: Backend) -> None:
    backend.open().close()
    twice = "CREATE TABLE half (id INTEGER); CREATE TABLE half (id INTEGER);"
    broken = Migration("9999_broken", sqlite=twice, postgres=twice)
    with pytest.raises(StoreFailure):
        backend.open(migrations=(*MIGRATIONS, broken))
    assert "half" not in backend.tables()
    reopened = backend.open()
    assert "9999_broken" not in reopened.applied_migrations()
    reopened.close()


def test_add_artifact_is_idempotent_and_keeps_several_formats(store: Store) -> None:
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


def test_same_file_with_other_content_is_a_conflict_and_changes_nothing(store: Store) -> None:
    store.add_artifact(ModelName("m"), artifact(), capabilities={}, actor="t")
    with pytest.raises(ModelExists):
        store.add_artifact(ModelName("m"), artifact(DIGEST_B), capabilities={}, actor="t")
    assert [blob.digest for blob in store.list_blobs()] == [DIGEST_A]


def test_several_artifacts_register_together_or_not_at_all(store: Store) -> None:
    name = ModelName("repo")
    files = [
        artifact(DIGEST_A, "model.safetensors", "safetensors"),
        artifact(DIGEST_B, "config.json", "file"),
    ]
    model, added = store.add_artifacts(name, files, capabilities={"dtypes": ["F16"]}, actor="t")
    assert added
    assert sorted(a.filename for a in model.artifacts) == ["config.json", "model.safetensors"]
    assert model.capabilities == {"dtypes": ["F16"]}
    again, added_again = store.add_artifacts(name, files, capabilities={}, actor="t")
    assert not added_again
    assert len(again.artifacts) == 2

    other = ModelName("other")
    store.add_artifact(other, artifact(DIGEST_A, "x.gguf"), capabilities={}, actor="t")
    clash = [artifact("sha256:" + "c" * 64, "config.json", "file"), artifact(DIGEST_B, "y.gguf")]
    with pytest.raises(ModelExists):  # the second file is a second GGUF: the first is not kept either
        store.add_artifacts(other, clash, capabilities={}, actor="t", sole_formats=("gguf",))
    kept = store.get_model(other)
    assert kept is not None
    assert [a.filename for a in kept.artifacts] == ["x.gguf"]
    assert "sha256:" + "c" * 64 not in {blob.digest for blob in store.list_blobs()}


def test_remove_reports_only_blobs_nobody_else_uses(store: Store) -> None:
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


def test_pin_and_touch(store: Store) -> None:
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


def test_audit_filters(store: Store) -> None:
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


def test_preferences_round_trip(store: Store) -> None:
    store.set_preference("models.cache.max_bytes", 1000, actor="t")
    store.set_preference("models.download.allowed_sources", ["hf"], actor="t")
    assert store.get_preference("models.cache.max_bytes") == 1000
    assert store.list_preferences() == {
        "models.cache.max_bytes": 1000,
        "models.download.allowed_sources": ["hf"],
    }
    store.set_preference("models.cache.max_bytes", None, actor="t")
    assert store.get_preference("models.cache.max_bytes") is None


def test_two_stores_on_one_database_write_concurrently(backend: Backend) -> None:
    """The server and a CLI command share the database; writes wait for each other instead of failing."""
    stores = [backend.open(), backend.open()]
    errors: list[BaseException] = []

    def write(store: Store, prefix: str) -> None:
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


def test_a_download_moves_from_a_state_only_once(store: Store) -> None:
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


def test_download_progress_and_outcome_are_stored_as_given(store: Store) -> None:
    created = store.create_download(
        Download(id="d1", ref="hf:org/repo/m.gguf", state="queued", requested_by="u")
    )
    store.update_download("d1", state="running", model_name="m:latest", expected_digest=DIGEST_A)
    store.update_download("d1", bytes_done=5, bytes_total=10, rate_bytes_per_s=100)
    store.update_download("d1", note="the server ignores Range: starting over")
    failed = store.update_download("d1", state="failed", error="reset", error_code="download_failed")
    assert (failed.model_name, failed.expected_digest) == ("m:latest", DIGEST_A)
    assert (failed.error, failed.error_code) == ("reset", "download_failed")
    assert failed.note == "the server ignores Range: starting over"
    assert (failed.bytes_done, failed.bytes_total, failed.rate_bytes_per_s) == (5, 10, 100)
    done = store.update_download(
        "d1", state="done", digest=DIGEST_A, bytes_done=10, error=None, error_code=None, note=None
    )
    assert (done.state, done.digest, done.bytes_done, done.error) == ("done", DIGEST_A, 10, None)
    assert (done.error_code, done.note) == (None, None)
    assert (done.ref, done.requested_by, done.created_at) == (created.ref, "u", created.created_at)
    assert done.updated_at > created.updated_at
    assert store.list_downloads(states=("done",)) == [done]


def test_a_made_up_download_column_is_refused_and_changes_nothing(store: Store) -> None:
    store.create_download(Download(id="d1", ref="https://m.lan/m.gguf", state="queued", requested_by="u"))
    before = store.get_download("d1")
    with pytest.raises(ValueError, match="not a download column"):
        store.update_download("d1", state="done", stat="done")  # type: ignore[call-arg]
    assert store.get_download("d1") == before


def test_replacing_takes_the_old_file_out_in_the_same_write(store: Store) -> None:
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


# -- users and API keys ----------------------------------------------------------------------------


def test_users_are_added_once_changed_and_removed_with_their_keys(store: Store) -> None:
    store.create_user(User(name="alice", role="user", password_hash="h1"))
    with pytest.raises(UserExists):
        store.create_user(User(name="alice", role="admin", password_hash=None))
    assert [user.name for user in store.list_users()] == ["alice"]
    changed = store.update_user("alice", role="admin", password_hash="h2")
    assert (changed.role, changed.password_hash) == ("admin", "h2")
    with pytest.raises(UserNotFound):
        store.update_user("bob", role="user")
    store.create_api_key(ApiKey("k1", "laptop", "apl_abc", "f" * 64, "user", "alice", "cli:root"))
    store.create_api_key(ApiKey("k2", "ci", "apl_def", "e" * 64, "user", None, "cli:root"))
    with pytest.raises(UserNotFound):
        store.create_api_key(ApiKey("k3", "x", "apl_ghi", "d" * 64, "user", "bob", "cli:root"))
    assert store.remove_user("alice").name == "alice"
    assert [key.id for key in store.list_api_keys()] == ["k2"]
    with pytest.raises(UserNotFound):
        store.remove_user("alice")


def test_login_sessions_are_found_by_hash_and_end_alone_by_user_or_with_the_user(store: Store) -> None:
    store.create_user(User(name="alice", role="user", password_hash="h"))
    store.create_user(User(name="bob", role="user", password_hash="h"))

    def session(digest: str, user: str, created: str = "2030-01-01T00:00:00.000000Z") -> LoginSession:
        return LoginSession(digest * 64, user, "csrf", "127.0.0.1", created, "2030-01-02T00:00:00.000000Z")

    old = store.create_login_session(session("a", "alice", "2029-01-01T00:00:00.000000Z"))
    assert store.get_login_session("a" * 64) == old
    with pytest.raises(UserNotFound):
        store.create_login_session(session("x", "carol"))
    # A new login sweeps the sessions that expired before it began.
    store.create_login_session(session("b", "alice", "2030-01-03T00:00:00.000000Z"))
    assert store.get_login_session("a" * 64) is None
    store.create_login_session(session("c", "alice"))
    store.create_login_session(session("d", "bob"))
    assert store.delete_login_session("c" * 64) is True
    assert store.delete_login_session("c" * 64) is False
    assert store.delete_login_sessions("alice") == 1  # b
    store.remove_user("bob")
    assert store.get_login_session("d" * 64) is None


def test_an_api_key_is_found_by_its_hash_revoked_once_and_touched(store: Store) -> None:
    store.create_user(User(name="alice", role="user", password_hash=None))
    key = store.create_api_key(ApiKey("k1", "laptop", "apl_abc", "f" * 64, "user", "alice", "cli:root"))
    assert store.find_api_key("f" * 64) == key
    assert store.find_api_key("0" * 64) is None
    assert store.list_api_keys(user_name="alice") == [key]
    assert store.list_api_keys(user_name="bob") == []
    store.touch_api_key("k1", "2030-01-01T00:00:00.000000Z")
    assert store.get_api_key("k1").last_used_at == "2030-01-01T00:00:00.000000Z"  # type: ignore[union-attr]
    first = store.revoke_api_key("k1").revoked_at
    assert first is not None
    assert store.revoke_api_key("k1").revoked_at == first
    with pytest.raises(ApiKeyNotFound):
        store.revoke_api_key("nope")


def test_a_server_registers_again_under_its_id_and_is_found_by_its_credential(store: Store) -> None:
    def at(day: int) -> str:
        return f"2030-01-0{day}T00:00:00.000000Z"

    first = Server("s1", "http://a:8080", "1" * 64, "1.0", at(1), at(1))
    other = Server("s2", "https://b:8443", "2" * 64, "1.0", at(2), at(2), ca_pem="PEM")
    store.register_server(other)
    store.register_server(first)
    assert store.list_servers() == [first, other]
    assert store.find_server("2" * 64) == other
    # A restart: the same id with a new URL and credential; the old credential stops working.
    restarted = Server("s1", "http://a:9090", "3" * 64, "1.1", at(3), at(3))
    store.register_server(restarted)
    assert store.find_server("1" * 64) is None
    assert store.find_server("3" * 64) == restarted
    assert store.touch_server("s1", at(4)) is True
    assert [server.last_seen_at for server in store.list_servers()] == [at(2), at(4)]  # s2, then s1
    assert store.touch_server("nope", at(4)) is False


def test_an_artifact_is_found_by_the_source_it_came_from(store: Store) -> None:
    def fetched(name: str, digest: str, source: str) -> None:
        file = NewArtifact(filename="m.gguf", format="gguf", digest=digest, size_bytes=10, source_uri=source)
        store.add_artifact(ModelName(name), file, capabilities={}, actor="t")

    fetched("a", DIGEST_A, "hf:org/repo#m.gguf")
    fetched("b", DIGEST_B, "hf:org/repo-2#m.gguf")  # a longer source with the same beginning
    found = store.find_artifact_by_source("hf:org/repo")
    assert found is not None
    assert (found[0].name, found[1].digest) == (ModelName("a"), DIGEST_A)
    assert store.find_artifact_by_source("hf:org/repo-2#m.gguf") is not None
    assert store.find_artifact_by_source("hf:org") is None
    assert store.cache_bytes() == 20


def test_inference_records_list_newest_first_per_model(store: Store) -> None:
    for index, model in enumerate(["a", "b", "a"]):
        store.append_inference(
            InferenceRecord(
                model, "/v1/chat/completions", "local", "", "loaded", "ok", 3, index, 10, f"c{index}"
            )
        )
    assert [record.completion_tokens for record in store.list_inference()] == [2, 1, 0]
    assert [record.completion_tokens for record in store.list_inference(model="a", limit=1)] == [2]


def test_rows_made_in_the_same_instant_list_in_the_order_they_were_made(store: Store) -> None:
    """Downloads and tasks newest first, keys and join tokens oldest first: a tie on the timestamp
    goes by insertion, not by id."""
    at = "2030-01-01T00:00:00.000000Z"
    for download_id in ("d2", "d1", "d3"):
        store.create_download(
            Download(id=download_id, ref="hf:o/r", state="queued", requested_by="u", created_at=at)
        )
    assert [d.id for d in store.list_downloads(ref="hf:o/r")] == ["d3", "d1", "d2"]
    assert [d.id for d in store.list_downloads(ref="hf:o/r", states=("queued",), limit=2)] == ["d3", "d1"]
    assert store.list_downloads(ref="other") == []
    for key_id in ("k2", "k1"):
        store.create_api_key(ApiKey(key_id, key_id, "apl_", key_id * 32, "user", None, "t", created_at=at))
    assert [key.id for key in store.list_api_keys()] == ["k2", "k1"]
