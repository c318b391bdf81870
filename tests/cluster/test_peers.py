"""Servers sharing one database, each with its own blob cache: a model one registered is fetched
from it by another (over the blob route workers use, as a server), or pulled again by its ref, and
never served half-present. Two real servers on loopback, each with its own data dir, on one
SQLite file (one machine) and on one PostgreSQL schema."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import apsw
import httpx
import psycopg
import pytest
import uvicorn

from appliance.audit import Context
from appliance.cluster import peers
from appliance.cluster.tokens import make_server_credential
from appliance.engine.router import resolve_spec
from appliance.errors import ModelNotPresent, StorageFailure
from appliance.names import ModelName
from appliance.runtime import Runtime
from appliance.settings import ServerSettings, Settings, StoreSettings, default_advertise_url
from appliance.store.base import NewArtifact, Server
from appliance.tls import init_tls
from appliance.web.app import create_app
from tests.fileserver import serve_files
from tests.models.conftest import fill, small_disk
from tests.web.serving import serving

__all__ = ["small_disk"]  # a fixture this module uses from the models' tests

GENERATE = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 4, "temperature": 0}}


@dataclass
class Running:
    url: str
    runtime: Runtime
    client: httpx.Client
    stop: Callable[[], None]

    @property
    def blob_dir(self) -> Path:
        return self.runtime.cache.blobs_dir


def _postgres_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One database both servers use: a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return _postgres_url(request)


@pytest.fixture
def start(tmp_path: Path, store_url: str) -> Iterator[Callable[..., Running]]:
    """``start(name, **server settings)``: a server with the data dir ``tmp_path/name`` on the shared
    database, served by uvicorn on a free loopback port in this process."""
    running: list[Running] = []

    def launch(name: str, *, tls: bool = False, **server: Any) -> Running:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        if tls:  # peers reach it at https://127.0.0.1 and trust the CA its row carries
            server["advertise_url"] = url
        settings = Settings(
            data_dir=tmp_path / name,
            port=port,
            store=StoreSettings(url=store_url),
            server=ServerSettings(**server),
        )
        files = init_tls(settings, []) if tls else None
        with warnings.catch_warnings():  # Litestar warns, at build, of handlers other modules declare
            warnings.simplefilter("ignore", DeprecationWarning)
            app = create_app(settings)
        uv = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                lifespan="on",
                ssl_certfile=files.server.cert if files else None,
                ssl_keyfile=files.server.key if files else None,
            )
        )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=lambda: loop.run_until_complete(uv.serve(sockets=[listener])), daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 60
        while not uv.started:
            assert thread.is_alive(), "the server did not start"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.02)
        verify = ssl.create_default_context(cafile=files.ca_cert) if files else True
        client = httpx.Client(base_url=url, timeout=60, verify=verify)
        stopped = threading.Event()

        def stop() -> None:
            if stopped.is_set():
                return
            stopped.set()
            client.close()
            uv.should_exit = True
            thread.join(timeout=30)
            listener.close()
            loop.close()

        served = Running(url, app.state.runtime, client, stop)
        running.append(served)
        return served

    yield launch
    for served in reversed(running):
        served.stop()


def _import_on(server: Running, source: Path) -> str:
    imported = server.client.post("/api/v1/models/import", json={"path": str(source), "name": "tiny"})
    assert imported.status_code in (200, 201), imported.text
    digest = server.runtime.models.get("tiny").artifacts[0].digest
    assert server.runtime.cache.has(digest)
    return digest


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_b_serves_a_model_a_imported_by_fetching_it_from_as_cache(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    tiny_gguf.unlink()  # nothing to pull it again from: only A's cache has it
    assert not b.runtime.cache.has(digest)

    answer = b.client.post("/api/generate", json=GENERATE)

    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True
    fetched = b.blob_dir / digest.removeprefix("sha256:")
    assert _sha256(fetched) == digest
    assert oct(fetched.stat().st_mode & 0o777) == "0o444"  # placed like any blob
    events = b.runtime.store.list_audit(action="models.fetch")
    assert [(e.actor, e.outcome, e.detail["peer"], e.detail["url"]) for e in events] == [
        (f"server:{b.runtime.peers.id}", "ok", a.runtime.peers.id, a.url)
    ]
    listed = {s["id"]: s for s in b.client.get("/api/v1/servers").json()}
    assert listed[a.runtime.peers.id]["url"] == a.url
    assert listed[a.runtime.peers.id]["alive"] is True
    assert listed[b.runtime.peers.id]["this"] is True


def test_a_wrong_server_credential_gets_401_and_a_right_one_reaches_the_blob_route_only(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    digest = _import_on(a, tiny_gguf)
    blob = f"/api/v1/blobs/{digest}"
    wrong = a.client.get(blob, headers={"Authorization": f"Bearer {make_server_credential()}"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    refused = a.runtime.store.list_audit(action="auth.failed")
    assert [event.detail for event in refused] == [{"reason": "unknown server credential"}]

    # A server's real credential, as the store holds it (the test plays that server).
    credential = make_server_credential()
    a.runtime.store.register_server(
        Server("peer-x", "http://127.0.0.1:9", hashlib.sha256(credential.encode()).hexdigest(), "0")
    )
    bearer = {"Authorization": f"Bearer {credential}"}
    got = a.client.get(blob, headers={**bearer, "Range": "bytes=0-3"})
    assert got.status_code == 206
    assert got.content == b"GGUF"
    assert a.client.post("/api/v1/cluster/heartbeat", json={}, headers=bearer).status_code == 401


def test_with_auth_on_a_server_credential_is_refused_beyond_the_blob_route(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a", auth="on")
    credential = make_server_credential()
    a.runtime.store.register_server(
        Server("peer-x", "http://127.0.0.1:9", hashlib.sha256(credential.encode()).hexdigest(), "0")
    )
    a.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    digest = a.runtime.models.get("tiny").artifacts[0].digest
    bearer = {"Authorization": f"Bearer {credential}"}
    assert a.client.head(f"/api/v1/blobs/{digest}", headers=bearer).status_code == 200
    assert a.client.get("/api/v1/models", headers=bearer).status_code == 403
    assert a.client.get("/api/v1/servers", headers=bearer).status_code == 403


def test_a_peer_that_went_away_means_pulling_again_by_ref(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    a.stop()  # its row still reads alive: B finds it unreachable

    answer = b.client.post("/api/generate", json=GENERATE)

    assert answer.status_code == 200, answer.text
    assert _sha256(b.blob_dir / digest.removeprefix("sha256:")) == digest
    assert b.runtime.store.list_audit(action="models.fetch") == []
    pulled = b.runtime.store.list_audit(action="models.import", actor=f"server:{b.runtime.peers.id}")
    assert [e.detail["source"] for e in pulled] == [str(tiny_gguf)]


def test_with_no_peer_and_no_source_the_error_says_what_to_do(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    a.stop()
    tiny_gguf.unlink()

    answer = b.client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )

    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "model_not_present"
    assert "no peer holds it" in error["message"]
    assert "unreachable" in error["message"]
    assert not b.runtime.cache.has(digest)


def test_wrong_bytes_from_a_peer_are_discarded_and_nothing_is_placed(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    tiny_gguf.unlink()
    on_a = a.blob_dir / digest.removeprefix("sha256:")
    on_a.chmod(0o644)
    content = bytearray(on_a.read_bytes())
    content[-1] ^= 0xFF  # same size, other content: only the hash tells
    on_a.write_bytes(bytes(content))

    answer = b.client.post("/api/generate", json=GENERATE)

    assert answer.status_code == 503
    assert "hash to" in answer.json()["error"]
    assert not b.runtime.cache.has(digest)
    leftovers = [p.name for p in b.runtime.cache.downloads_dir.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    failed = b.runtime.store.list_audit(action="models.fetch")
    assert [(e.outcome, e.detail["error"]) for e in failed] == [("error", "digest_mismatch")]


def test_while_the_blob_comes_a_request_gets_503_with_retry_after_then_it_is_served(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b", peer_wait=0.001)  # far shorter than a fetch over HTTP
    digest = _import_on(a, tiny_gguf)

    first = b.client.post("/api/v1/models/load", json={"name": "tiny"})

    assert first.status_code == 503, first.text
    assert first.headers["retry-after"] == "5"
    assert first.json()["code"] == "blob_fetching"
    deadline = time.monotonic() + 30
    while not b.runtime.cache.has(digest):
        assert time.monotonic() < deadline, "the fetch never finished"
        time.sleep(0.05)
    assert b.client.post("/api/v1/models/load", json={"name": "tiny"}).status_code == 200
    assert _sha256(b.blob_dir / digest.removeprefix("sha256:")) == digest


def test_verify_on_a_server_without_the_blob_leaves_it_alone_for_the_others(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    digest = _import_on(a, tiny_gguf)

    results = b.client.post("/api/v1/models/verify", json={"name": "tiny"})

    assert results.status_code == 200, results.text
    assert results.json()[0]["detail"] == "not in this server's cache; not checked"
    assert a.runtime.store.get_blob(digest).state == "ok"  # type: ignore[union-attr]
    assert a.client.post("/api/generate", json=GENERATE).status_code == 200


def test_the_cli_lists_the_servers_sharing_the_database(
    start: Callable[..., Running], cli: Any, store_url: str, data_dir: Path
) -> None:
    a = start("a")
    result = cli("servers", "--json", env={"APPLIANCE_STORE__URL": store_url})
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(s["id"], s["url"], s["alive"], s["this"]) for s in listed] == [
        (a.runtime.peers.id, a.url, True, False)
    ]
    table = cli("servers", env={"APPLIANCE_STORE__URL": store_url})
    assert a.runtime.peers.id in table.stdout
    assert "alive" in table.stdout


def test_the_advertised_url_defaults_to_a_public_name_or_the_bound_address() -> None:
    assert default_advertise_url(Settings(port=8080), tls=False) == "http://127.0.0.1:8080"
    named = Settings(host="0.0.0.0", port=8443, server=ServerSettings(public_names=["box.lan"]))
    assert default_advertise_url(named, tls=True) == "https://box.lan:8443"
    everywhere = Settings(host="::", port=80)
    assert default_advertise_url(everywhere, tls=False) == f"http://{socket.gethostname()}:80"


def test_two_serve_processes_on_one_database_fetch_from_each_other(
    tmp_path: Path, store_url: str, tiny_gguf: Path
) -> None:
    env = {"APPLIANCE_STORE__URL": store_url}
    with serving(tmp_path / "a", env=env) as a, serving(tmp_path / "b", env=env) as b:
        imported = a.client.post("/api/v1/models/import", json={"path": str(tiny_gguf), "name": "tiny"})
        assert imported.status_code in (200, 201), imported.text
        tiny_gguf.unlink()

        answer = b.client.post("/api/generate", json=GENERATE)

        assert answer.status_code == 200, answer.text
        digest = imported.json()["digest"]
        assert _sha256(tmp_path / "b" / "blobs" / "sha256" / digest.removeprefix("sha256:")) == digest
        listed = b.client.get("/api/v1/servers").json()
        assert sorted((s["url"], s["alive"]) for s in listed) == sorted([(a.url, True), (b.url, True)])


def test_a_pull_of_a_ref_another_server_pulled_fetches_from_it_not_the_source(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    with serve_files() as files:
        url = files.add("/tiny.gguf", tiny_gguf.read_bytes())
        first = a.runtime.provisioner.ensure_present(url, Context.cli())

        again = b.runtime.provisioner.ensure_present(url, Context.cli())

        assert (again.digest, again.downloaded) == (first.digest, False)
        assert _sha256(again.path) == first.digest
        downloads = [hit for hit in files.hits_for("/tiny.gguf") if hit.range == "bytes=0-0"]
        assert len(downloads) == 1  # A's; B's bytes came from A
    fetched = b.runtime.store.list_audit(action="models.fetch")
    assert [(e.target, e.detail["peer"]) for e in fetched] == [(first.digest, a.runtime.peers.id)]


def _forget_servers(store_url: str) -> None:
    """Delete every servers row past the store, as restoring an older backup of the database would."""
    if store_url.startswith("sqlite:"):
        connection = apsw.Connection(store_url.removeprefix("sqlite://"))
        connection.set_busy_timeout(10_000)  # the server heartbeats meanwhile
        try:
            connection.execute("DELETE FROM servers")
        finally:
            connection.close()
        return
    with psycopg.connect(store_url, autocommit=True) as connection:
        connection.execute("DELETE FROM servers")


def test_a_server_whose_row_was_forgotten_registers_again_at_its_next_heartbeat(
    start: Callable[..., Running], monkeypatch: pytest.MonkeyPatch, store_url: str
) -> None:
    monkeypatch.setattr(peers, "HEARTBEAT_SECONDS", 0.05)
    a = start("a")
    _forget_servers(store_url)
    deadline = time.monotonic() + 10
    while not (rows := a.runtime.store.list_servers()):
        assert time.monotonic() < deadline, "the server never registered again"
        time.sleep(0.05)
    assert [row.url for row in rows] == [a.url]
    assert [s["alive"] for s in a.client.get("/api/v1/servers").json()] == [True]


def test_a_command_on_another_data_dir_does_not_fetch_and_says_so(
    start: Callable[..., Running], tiny_gguf: Path, tmp_path: Path, store_url: str
) -> None:
    a = start("a")
    _import_on(a, tiny_gguf)
    command = Runtime.open(Settings(data_dir=tmp_path / "cli", store=StoreSettings(url=store_url)))
    try:
        with pytest.raises(ModelNotPresent, match="only a running server fetches it from its peers"):
            resolve_spec(command.models, "tiny")
    finally:
        command.close()


def test_a_blob_with_no_source_and_no_peer_cannot_be_brought(start: Callable[..., Running]) -> None:
    a = start("a")
    b = start("b")
    layer = b"{{ .Prompt }}"
    with a.runtime.cache.receive() as incoming:  # as an upload (/api/blobs) places it: no source
        incoming.write(layer)
        digest = "sha256:" + hashlib.sha256(layer).hexdigest()
        incoming.finish(digest)
    a.runtime.store.add_artifact(
        ModelName.parse("bare"),
        NewArtifact(
            filename="template", format="file", digest=digest, size_bytes=len(layer), source_uri=None
        ),
        capabilities={},
        actor="test",
    )
    a.stop()
    with pytest.raises(ModelNotPresent, match="it has no source to pull it from"):
        b.runtime.models.bring_blobs(b.runtime.models.get("bare"))
    assert not b.runtime.cache.has(digest)


def test_a_source_that_changed_since_is_not_pulled_again(
    start: Callable[..., Running], tiny_gguf: Path, make_gguf: Any
) -> None:
    a = start("a")
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    a.stop()
    tiny_gguf.write_bytes(make_gguf("other.gguf", seed=7).read_bytes())  # other content, same path

    answer = b.client.post("/api/generate", json=GENERATE)

    assert answer.status_code == 503
    assert f"expected {digest}" in answer.json()["error"]
    assert not b.runtime.cache.has(digest)


def test_an_unreadable_server_id_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "server-id").mkdir()
    with pytest.raises(StorageFailure, match="server-id"):
        peers.server_id(tmp_path)


def test_a_peer_serving_https_with_its_own_ca_is_trusted_through_its_row(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a", tls=True)
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    tiny_gguf.unlink()
    (row,) = [s for s in b.runtime.store.list_servers() if s.id == a.runtime.peers.id]
    assert row.url.startswith("https://")
    assert row.ca_pem == (a.runtime.settings.data_dir / "tls" / "ca.crt").read_text()

    answer = b.client.post("/api/generate", json=GENERATE)

    assert answer.status_code == 200, answer.text
    assert _sha256(b.blob_dir / digest.removeprefix("sha256:")) == digest


def test_a_peer_whose_certificate_is_not_of_the_ca_in_its_row_is_not_trusted(
    start: Callable[..., Running], tiny_gguf: Path, tmp_path: Path
) -> None:
    a = start("a", tls=True)
    b = start("b")
    digest = _import_on(a, tiny_gguf)
    tiny_gguf.unlink()
    other_ca = init_tls(Settings(data_dir=tmp_path / "elsewhere"), []).ca_cert.read_text()
    (row,) = [s for s in b.runtime.store.list_servers() if s.id == a.runtime.peers.id]
    b.runtime.store.register_server(replace(row, ca_pem=other_ca))

    answer = b.client.post("/api/generate", json=GENERATE)

    assert answer.status_code == 503
    assert "CERTIFICATE_VERIFY_FAILED" in answer.json()["error"]
    assert not b.runtime.cache.has(digest)


def test_a_server_on_a_full_disk_still_starts_and_registers_once_there_is_room(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers, "HEARTBEAT_SECONDS", 0.05)
    runtime = Runtime.open(Settings(data_dir=small_disk / "data"))
    try:
        fill(small_disk)
        runtime.peers.start()  # as the server does when it begins to serve
        assert runtime.store.list_servers() == []
        (small_disk / "filler").unlink()
        deadline = time.monotonic() + 10
        while not runtime.store.list_servers():
            assert time.monotonic() < deadline, "the heartbeat never registered the server"
            time.sleep(0.05)
    finally:
        runtime.close()


def test_eviction_on_a_shared_registry_drops_only_this_servers_copy(
    start: Callable[..., Running], tiny_gguf: Path, make_gguf: Any
) -> None:
    a = start("a")
    b = start("b")
    tiny = _import_on(a, tiny_gguf)
    a.runtime.models.import_file(make_gguf("other.gguf", seed=7), Context.cli(), name="other")
    other = a.runtime.models.get("other").artifacts[0].digest
    for name in ("tiny", "other"):
        b.runtime.models.bring_blobs(b.runtime.models.get(name))
    b.runtime.store.touch_model(ModelName.parse("other"))  # tiny is the least recently used
    budget = b.runtime.store.get_blob(other)
    assert budget is not None
    b.runtime.preferences.set("models.cache.max_bytes", budget.size_bytes + 100, Context.cli())

    report = b.runtime.models.gc(Context.cli())

    assert report.evicted == ("tiny:latest",)
    assert not b.runtime.cache.has(tiny)  # B's copy is gone...
    assert b.runtime.cache.has(other)
    assert a.runtime.cache.has(tiny)  # ...A's stays, and the model is still registered for both
    assert [str(m.name) for m in a.runtime.store.list_models()] == ["other:latest", "tiny:latest"]
    (evicted,) = b.runtime.store.list_audit(action="models.evict")
    assert evicted.detail == {"digests": [tiny], "here_only": True}
    assert b.client.post("/api/generate", json=GENERATE).status_code == 200  # fetched back from A
    assert b.runtime.cache.has(tiny)


def test_gc_on_a_shared_registry_does_not_call_the_others_blobs_missing(
    start: Callable[..., Running], tiny_gguf: Path
) -> None:
    a = start("a")
    b = start("b")
    _import_on(a, tiny_gguf)

    report = b.runtime.models.gc(Context.cli())

    assert report.missing == ()
    assert a.runtime.models.get("tiny").state == "ok"
