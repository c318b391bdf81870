"""Pulls on several servers that share one store: the single flight, the slots, cancels and
approvals reach across them.

Each test runs twice: on SQLite, two runtimes on one data dir (a server and a CLI pull of one
machine: one cache, flock files); on PostgreSQL, two runtimes with data dirs of their own on one
schema (two servers: a cache each, advisory locks, LISTEN/NOTIFY).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import pytest

from appliance.audit import Context
from appliance.errors import DownloadCancelled, DownloadNotPending, Offline
from appliance.provision.downloads import PullProgress
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import Artifact, Download
from tests.conftest import APPLIANCE, Server, free_port
from tests.fileserver import Faults, FileServer
from tests.provision.test_pull import MIB, _wait_for_state, digest_of, wait_until

ADMIN = Context(actor="admin")

OpenServer = Callable[..., Runtime]


@pytest.fixture(params=["sqlite", "postgres"])
def open_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenServer]:
    """``open_server(name, **download_settings)``: a runtime standing for the server ``name``."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened: list[Runtime] = []

    def open_one(name: str, **download: object) -> Runtime:
        settings = Settings(
            data_dir=tmp_path / (name if url else "data"),
            store={"url": url},
            models={"download": {"part_bytes": MIB, "connections": 4, "stall_timeout": 1.0, **download}},
        )
        runtime = Runtime.open(settings)
        opened.append(runtime)
        return runtime

    yield open_one
    for runtime in opened:
        runtime.close()


def shared_cache(server: Runtime) -> bool:
    return server.store.shared_locks() is None  # SQLite: one data dir, one cache


def fill_from(peer: Runtime, server: Runtime) -> list[str]:
    """Let ``server`` fill its cache from ``peer``'s, as the peers service does over HTTP; returns
    the digests it fills."""
    filled: list[str] = []

    def copy(artifact: Artifact) -> bool:
        with server.cache.receive() as incoming:
            incoming.write(peer.cache.path(artifact.digest).read_bytes())
            incoming.finish(artifact.digest)
        filled.append(artifact.digest)
        return True

    server.provisioner.fill_blob = copy
    return filled


def probes(files: FileServer, path: str) -> int:
    """Downloads started: each begins with a one-byte probe."""
    return len([hit for hit in files.hits_for(path) if hit.range == "bytes=0-0" and hit.status == 206])


def test_a_pull_running_on_one_server_stays_running_when_another_opens_and_lists(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first = open_server("a")
    url = files.add("/slow.gguf", model_bytes, Faults(bytes_per_second=2 * MIB))
    ticket = first.provisioner.start(url, context)
    running = _wait_for_state(first, "running")
    second = open_server("b")  # opening marks the rows of pulls whose process is gone
    assert [d.state for d in second.provisioner.list_downloads()] == ["running"]
    assert ticket.future.result(timeout=60).digest == digest_of(model_bytes)
    assert second.provisioner.get_download(running.id).state == "done"  # type: ignore[attr-defined]


def test_eight_pulls_of_one_ref_on_two_servers_download_it_once_for_each_cache(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    servers = [open_server("a"), open_server("b")]
    url = files.add("/popular.gguf", model_bytes, Faults(bytes_per_second=8 * MIB))
    results: list[object] = []

    def pull(server: Runtime) -> None:
        try:
            results.append(server.provisioner.ensure_present(url, context).digest)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=pull, args=(servers[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [digest_of(model_bytes)] * 8
    downloads = servers[0].provisioner.list_downloads()
    # one cache: one download; a cache each: each server fetched the bytes once, one after the other
    assert [d.state for d in downloads] == ["done"] * (1 if shared_cache(servers[0]) else 2)
    assert probes(files, "/popular.gguf") == len(downloads)
    for server in servers:
        (model,) = server.models.list_models()
        assert [a.digest for a in model.artifacts] == [digest_of(model_bytes)]
        assert server.cache.path(digest_of(model_bytes)).read_bytes() == model_bytes


def test_a_blob_a_peer_holds_fills_this_servers_cache_without_a_download(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first, second = open_server("a"), open_server("b")
    filled = fill_from(first, second)
    url = files.add("/peer.gguf", model_bytes)
    first.provisioner.ensure_present(url, context)
    again = second.provisioner.ensure_present(url, context)
    assert (again.digest, again.downloaded) == (digest_of(model_bytes), False)
    assert again.path.read_bytes() == model_bytes
    assert filled == ([] if shared_cache(first) else [digest_of(model_bytes)])
    assert len(second.provisioner.list_downloads()) == 1
    assert probes(files, "/peer.gguf") == 1


@pytest.mark.parametrize(
    "answer",
    [False, True],  # no peer has it; a peer said it filled the cache, yet the blob is not there
    ids=["no-peer", "blob-still-missing"],
)
def test_a_peer_without_the_blob_leaves_the_pull_to_download_it(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context, answer: bool
) -> None:
    first, second = open_server("a"), open_server("b")
    second.provisioner.fill_blob = lambda artifact: answer
    url = files.add("/nopeer.gguf", model_bytes)
    first.provisioner.ensure_present(url, context)
    again = second.provisioner.ensure_present(url, context)
    assert again.path.read_bytes() == model_bytes
    assert probes(files, "/nopeer.gguf") == (1 if shared_cache(first) else 2)


def test_download_slots_hold_across_servers(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first, second = open_server("a", max_parallel=1), open_server("b", max_parallel=1)
    slow = files.add("/first.gguf", model_bytes, Faults(bytes_per_second=2 * MIB))  # about 3 s
    other = files.add("/second.gguf", model_bytes[:-1] + b"\x01")
    running = first.provisioner.start(slow, context)
    _wait_for_state(first, "running")
    waiting = second.provisioner.start(other, context)
    wait_until(lambda: {d.ref: d.state for d in second.provisioner.list_downloads()}.get(other), "queued")
    time.sleep(0.6)  # longer than a slot waiter's look at the slots
    assert {d.ref: d.state for d in second.provisioner.list_downloads()} == {
        slow: "running",
        other: "queued",
    }
    assert files.hits_for("/second.gguf") == []
    running.future.result(timeout=60)
    waiting.future.result(timeout=60)
    assert sorted(d.state for d in first.provisioner.list_downloads()) == ["done", "done"]


def test_a_cancel_on_one_server_stops_the_pull_running_on_the_other(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first, second = open_server("a"), open_server("b")
    url = files.add("/cancel-me.gguf", model_bytes, Faults(bytes_per_second=MIB // 2))
    ticket = first.provisioner.start(url, context)
    running = _wait_for_state(first, "running")
    wait_until(lambda: probes(files, "/cancel-me.gguf") == 1, "the download's first request")
    cancelled = second.provisioner.cancel(running.id, ADMIN)  # type: ignore[attr-defined]
    asked = time.monotonic()
    assert (cancelled.state, cancelled.error) == ("cancelled", "cancelled by admin")
    with pytest.raises(DownloadCancelled):
        ticket.future.result(timeout=30)
    assert time.monotonic() - asked < 3
    row = first.provisioner.get_download(running.id)  # type: ignore[attr-defined]
    assert (row.state, row.error, row.rate_bytes_per_s) == ("cancelled", "cancelled by admin", 0)
    assert first.models.list_models() == []
    with pytest.raises(DownloadNotPending, match="is cancelled; nothing runs to cancel"):
        first.provisioner.cancel(running.id, ADMIN)  # type: ignore[attr-defined]
    audit = [(e.action, e.outcome) for e in second.store.list_audit() if e.action == "downloads.cancel"]
    assert audit == [("downloads.cancel", "error"), ("downloads.cancel", "ok")]


def test_a_cancel_that_arrives_with_the_last_byte_registers_nothing(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first, second = open_server("a"), open_server("b")
    url = files.add("/last-byte.gguf", model_bytes)
    cancelled: list[str] = []

    def cancel_at_the_end(update: PullProgress) -> None:
        if update.state == "running" and update.bytes_done == update.bytes_total and not cancelled:
            cancelled.append(second.provisioner.cancel(update.download_id, ADMIN).id)

    with pytest.raises(DownloadCancelled):
        first.provisioner.ensure_present(url, context, on_progress=cancel_at_the_end)
    assert first.models.list_models() == []
    assert first.provisioner.get_download(cancelled[0]).state == "cancelled"


def test_approval_and_cancel_from_another_server_reach_a_pending_pull(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first, second = open_server("a", require_user_approval=True), open_server("b")
    approved_url = files.add("/approve-me.gguf", model_bytes)
    ticket = first.provisioner.start(approved_url, context)
    pending = _wait_for_state(second, "pending")
    second.provisioner.decide(pending.id, approve=True, context=ADMIN)  # type: ignore[attr-defined]
    assert ticket.future.result(timeout=60).digest == digest_of(model_bytes)

    cancelled_url = files.add("/cancel-pending.gguf", model_bytes[:-1] + b"\x02")
    ticket = first.provisioner.start(cancelled_url, context)

    def pending_rows() -> list[Download]:
        return [d for d in second.provisioner.list_downloads(states=("pending",)) if d.ref == cancelled_url]

    wait_until(pending_rows, "the second pull pending")
    (pending,) = pending_rows()
    second.provisioner.cancel(pending.id, ADMIN)
    with pytest.raises(DownloadCancelled, match="while it waited for approval"):
        ticket.future.result(timeout=30)
    assert first.provisioner.get_download(pending.id).state == "cancelled"
    assert files.hits_for("/cancel-pending.gguf") == []


def test_a_cancel_reaches_a_pull_waiting_for_a_slot_on_another_server(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    first, second = open_server("a", max_parallel=1), open_server("b", max_parallel=1)
    slow = files.add("/slot-holder.gguf", model_bytes, Faults(bytes_per_second=MIB))
    other = files.add("/slot-waiter.gguf", model_bytes[:-1] + b"\x03")
    holder = first.provisioner.start(slow, context)
    _wait_for_state(first, "running")
    waiter = second.provisioner.start(other, context)
    queued = _wait_for_state(second, "queued")
    first.provisioner.cancel(queued.id, ADMIN)  # type: ignore[attr-defined]
    with pytest.raises(DownloadCancelled):
        waiter.future.result(timeout=10)
    assert not holder.future.done()  # the slot's holder goes on
    assert files.hits_for("/slot-waiter.gguf") == []
    first.provisioner.cancel(_wait_for_state(first, "running").id, ADMIN)  # type: ignore[attr-defined]
    with pytest.raises(DownloadCancelled):
        holder.future.result(timeout=30)


@pytest.fixture
def server_b(postgres_url: str, tmp_path: Path) -> Iterator[Server]:
    """``appliance serve --database`` on the PostgreSQL schema, with a data dir of its own."""
    port = free_port()
    command = ["--data-dir", str(tmp_path / "b"), "serve", "--port", str(port), "--database", postgres_url]
    process = subprocess.Popen([*APPLIANCE, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_until(lambda: _answers(client) or process.poll() is not None, "appliance serve answering")
        assert process.poll() is None, "appliance serve --database ended"
        yield Server(url=str(client.base_url), process=process, client=client)  # type: ignore[arg-type]
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def _answers(client: httpx.Client) -> bool:
    """Whether the API answers (``/healthz`` answers before the runtime has opened)."""
    try:
        return client.get("/api/v1/downloads").status_code == 200
    except httpx.TransportError:
        return False


def test_a_pull_on_one_server_shows_live_on_the_others_events(
    server_b: Server, postgres_url: str, tmp_path: Path, files: FileServer, model_bytes: bytes
) -> None:
    """Each progress write on A reaches B's stream through the change feed, not B's fallback poll."""
    lags: list[float] = []
    states: list[str] = []

    def follow() -> None:
        with server_b.client.stream("GET", "/api/v1/downloads/events") as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    row = json.loads(line.removeprefix("data:"))
                    written = datetime.strptime(row["updated_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
                    lags.append((datetime.now(UTC).replace(tzinfo=None) - written).total_seconds())
                    states.append(row["state"])
                    if row["state"] == "done":
                        return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(0.5)  # the stream is open
    settings = Settings(data_dir=tmp_path / "a", store={"url": postgres_url})
    first = Runtime.open(settings)
    try:
        url = files.add("/live.gguf", model_bytes, Faults(bytes_per_second=MIB // 2))
        first.provisioner.ensure_present(url, Context(actor="test"))
    finally:
        first.close()
    reader.join(timeout=30)
    assert states[-1] == "done"
    assert states.count("running") >= 4, states  # progress, about four times a second
    # B lists at most every EVENTS_INTERVAL (0.5 s) without a change: a median lag well under it
    # says the change woke the stream
    assert statistics.median(lags) < 0.2, lags


def test_offline_a_peer_still_fills_this_servers_cache(
    open_server: OpenServer, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    """A peer's copy needs no network to the source; with no peer, offline mode refuses the pull."""
    first, second = open_server("a"), open_server("b")
    url = files.add("/offline.gguf", model_bytes)
    first.provisioner.ensure_present(url, context)
    first.preferences.set("offline", True, ADMIN)
    hits = len(files.hits)
    if not shared_cache(first):
        with pytest.raises(Offline):
            second.provisioner.ensure_present(url, context)
    fill_from(first, second)
    assert second.provisioner.ensure_present(url, context).path.read_bytes() == model_bytes
    assert len(files.hits) == hits


def test_a_cancel_still_arrives_after_the_store_failed_to_answer_the_watch(
    postgres_url: str,
    tmp_path: Path,
    files: FileServer,
    model_bytes: bytes,
    context: Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The watch of a pull waiting for a slot reads its row; a read the database cancels (a table
    locked past A's statement timeout) is logged, and the next look sees the cancel."""
    impatient = postgres_url.replace("options=", f"options={quote('-cstatement_timeout=200 ')}")
    download = {"part_bytes": MIB, "max_parallel": 1}
    first = Runtime.open(
        Settings(data_dir=tmp_path / "a", store={"url": impatient}, models={"download": download})
    )
    second = Runtime.open(Settings(data_dir=tmp_path / "b", store={"url": postgres_url}))
    locks = second.store.shared_locks()
    assert locks is not None
    try:
        with locks.hold("download-slot:0", blocking=True):  # the only slot: the pull waits for it
            ticket = first.provisioner.start(files.add("/waits.gguf", model_bytes), context)
            queued = _wait_for_state(second, "queued")
            with psycopg.connect(postgres_url) as locker:
                locker.execute("LOCK TABLE downloads IN ACCESS EXCLUSIVE MODE")
                wait_until(lambda: "could not read download" in caplog.text, "the watch's failed read")
            second.provisioner.cancel(queued.id, ADMIN)  # type: ignore[attr-defined]
            with pytest.raises(DownloadCancelled):
                ticket.future.result(timeout=10)
    finally:
        first.close()
        second.close()
    assert "canceling statement due to statement timeout" in caplog.text
