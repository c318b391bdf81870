"""Pulls through the real CLI and the real server: SIGKILL and resume, processes racing, approval, the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.sqlite import SqliteStore
from tests.conftest import APPLIANCE, CliResult, Server, free_port
from tests.fileserver import Faults, FileServer
from tests.provision.test_pull import MIB, digest_of
from tests.tiny_model import write_llama_gguf

SMALL_PARTS = {
    "APPLIANCE_MODELS__DOWNLOAD__PART_BYTES": str(MIB),
    "APPLIANCE_MODELS__DOWNLOAD__CONNECTIONS": "2",
}


@pytest.fixture
def model_bytes(tmp_path: Path) -> bytes:
    return write_llama_gguf(tmp_path / "served.gguf", padding_bytes=8 * MIB).read_bytes()


def pull_process(data_dir: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "models", "pull", url, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **SMALL_PARTS},
    )


def state_files(data_dir: Path) -> list[Path]:
    return list((data_dir / "tmp" / "downloads").glob("*.state.json"))


def wait_for(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_cli_pull_then_already_present(cli: object, files: FileServer, model_bytes: bytes) -> None:
    url = files.add("/m/Pulled.gguf", model_bytes)
    first: CliResult = cli("models", "pull", url, "--digest", digest_of(model_bytes))  # type: ignore[operator]
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"pulled pulled:latest {digest_of(model_bytes)}")
    assert first.stdout.rstrip().endswith("expected)")
    again: CliResult = cli("models", "pull", url, "--json")  # type: ignore[operator]
    assert json.loads(again.stdout)["downloaded"] is False
    listed: CliResult = cli("downloads", "ls", "--json")  # type: ignore[operator]
    (download,) = json.loads(listed.stdout)
    assert (download["state"], download["bytes_done"], download["model_name"]) == (
        "done",
        len(model_bytes),
        "pulled:latest",
    )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_offline_makes_no_call(cli: object, files: FileServer, model_bytes: bytes, how: str) -> None:
    url = files.add("/m/offline.gguf", model_bytes)
    if how == "flag":
        result: CliResult = cli("--offline", "models", "pull", url)  # type: ignore[operator]
    else:
        result = cli("models", "pull", url, env={"APPLIANCE_OFFLINE": "1"})  # type: ignore[operator]
    assert result.returncode == 1
    assert "offline mode is on" in result.stderr
    assert files.hits == []


@pytest.mark.parametrize("kill_after_parts", [0, 2, 7], ids=["at-once", "midway", "near-the-end"])
def test_a_killed_pull_resumes_without_fetching_finished_parts_again(
    cli: object, files: FileServer, model_bytes: bytes, data_dir: Path, kill_after_parts: int
) -> None:
    faults = Faults(bytes_per_second=MIB)
    url = files.add("/m/big.gguf", model_bytes, faults)
    process = pull_process(data_dir, url)

    def finished_parts() -> list[int] | None:
        for path in state_files(data_dir):
            done = json.loads(path.read_text())["done"]
            return [index for index, count in enumerate(done) if count == MIB]
        return None

    wait_for(
        lambda: len(finished_parts() or ()) >= kill_after_parts and finished_parts() is not None, "parts"
    )
    process.send_signal(signal.SIGKILL)
    process.communicate()
    kept = finished_parts() or []
    listed: CliResult = cli("models", "ls", "--json")  # type: ignore[operator]
    assert json.loads(listed.stdout) == []
    assert list((data_dir / "blobs" / "sha256").iterdir()) == []

    faults.bytes_per_second = None
    hits_before = len(files.hits)
    resumed: CliResult = cli("models", "pull", url, "--digest", digest_of(model_bytes), env=SMALL_PARTS)  # type: ignore[operator]
    assert resumed.returncode == 0, resumed.stderr
    new_starts = [
        int((hit.range or "bytes=0-").split("=")[1].split("-")[0])
        for hit in files.hits[hits_before:]
        if hit.range != "bytes=0-0"
    ]
    assert not {start // MIB for start in new_starts} & set(kept)
    audit: CliResult = cli("audit", "ls", "--action", "models.pull", "--json")  # type: ignore[operator]
    (event,) = [e for e in json.loads(audit.stdout) if e["outcome"] == "ok"]
    assert event["detail"]["resumed_bytes"] >= len(kept) * MIB
    assert list((data_dir / "tmp" / "downloads").glob("*.partial")) == []
    downloads: CliResult = cli("downloads", "ls", "--json")  # type: ignore[operator]
    assert [d["state"] for d in json.loads(downloads.stdout)] == ["done"]  # the killed pull's row, finished


def test_processes_pulling_one_ref_make_one_download(
    cli: object, files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    url = files.add("/m/shared.gguf", model_bytes, Faults(bytes_per_second=8 * MIB))
    processes = [pull_process(data_dir, url, "--json") for _ in range(3)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    assert sorted(json.loads(out)["downloaded"] for out, _ in outputs) == [False, False, True]
    assert len([hit for hit in files.hits if hit.range == "bytes=0-0"]) == 1


def test_cli_approval(cli: object, files: FileServer, model_bytes: bytes, data_dir: Path) -> None:
    url = files.add("/m/approve-me.gguf", model_bytes)
    process = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "models", "pull", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "APPLIANCE_MODELS__DOWNLOAD__REQUIRE_USER_APPROVAL": "true"},
    )
    pending: list[dict[str, object]] = []

    def find_pending() -> bool:
        result: CliResult = cli("downloads", "ls", "--state", "pending", "--json")  # type: ignore[operator]
        pending.extend(json.loads(result.stdout))
        return bool(pending)

    wait_for(find_pending, "a pending download")
    unknown: CliResult = cli("downloads", "approve", "nope")  # type: ignore[operator]
    assert unknown.returncode == 1
    assert "download nope not found" in unknown.stderr
    approved: CliResult = cli("downloads", "approve", str(pending[0]["id"]))  # type: ignore[operator]
    assert approved.stdout.startswith("approved download")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "waits for an admin: appliance downloads approve" in err
    assert out.startswith("pulled approve-me:latest")


def test_api_pull_progress_approval_and_cancel(
    server: Server, files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    http = server.client
    url = files.add("/m/api.gguf", model_bytes)
    started = http.post("/api/v1/models/pull", json={"ref": url, "digest": digest_of(model_bytes)})
    assert started.status_code in (200, 202), started.text
    wait_for(lambda: http.get("/api/v1/models/api").status_code == 200, "the pulled model")
    present = http.post("/api/v1/models/pull", json={"ref": url})
    assert present.status_code == 200
    assert present.json()["downloaded"] is False

    bad = http.post("/api/v1/models/pull", json={"ref": "ftp://host/x.gguf"})
    assert bad.status_code == 400
    assert "unknown scheme" in bad.json()["detail"]

    store = SqliteStore(data_dir / "appliance.db")
    store.set_preference("models.download.require_user_approval", True, actor="test")
    store.close()
    slow = files.add("/m/slow.gguf", model_bytes, Faults(bytes_per_second=MIB))
    waiting = http.post("/api/v1/models/pull", json={"ref": slow})
    assert waiting.status_code == 202
    assert waiting.json()["state"] == "pending"
    download_id = waiting.json()["id"]
    assert [d["id"] for d in http.get("/api/v1/downloads", params={"state": "pending"}).json()] == [
        download_id
    ]
    with http.stream("GET", "/api/v1/downloads/events") as events:
        lines = events.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: download"
    approved = http.post(f"/api/v1/downloads/{download_id}/approve")
    assert approved.json()["state"] == "approved"
    wait_for(lambda: http.get(f"/api/v1/downloads/{download_id}").json()["bytes_done"] > 0, "progress")
    cancelled = http.delete(f"/api/v1/downloads/{download_id}")
    assert cancelled.status_code == 200
    wait_for(lambda: http.get(f"/api/v1/downloads/{download_id}").json()["state"] == "cancelled", "cancel")
    again = http.delete(f"/api/v1/downloads/{download_id}")
    assert again.status_code == 409
    assert http.get("/api/v1/downloads/nope").status_code == 404
    assert httpx.get(f"{server.url}/api/v1/models/slow").status_code == 404


def finished_parts(data_dir: Path) -> set[int]:
    for path in state_files(data_dir):
        done = json.loads(path.read_text())["done"]
        return {index for index, count in enumerate(done) if count == MIB}
    return set()


def test_a_killed_cli_pull_shows_interrupted_and_a_pull_with_a_digest_resumes_it(
    cli: object, files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    faults = Faults(etag=None, bytes_per_second=MIB)  # a server that sends no ETag or Last-Modified
    url = files.add("/m/no-etag.gguf", model_bytes, faults)
    process = pull_process(data_dir, url)
    wait_for(lambda: len(finished_parts(data_dir)) >= 2, "two finished parts")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    kept = finished_parts(data_dir)

    listed: CliResult = cli("downloads", "ls", "--json")  # type: ignore[operator]
    (download,) = json.loads(listed.stdout)
    assert download["state"] == "interrupted"
    assert "pull the ref again to resume" in download["note"]
    table: CliResult = cli("downloads", "ls")  # type: ignore[operator]
    assert "interrupted" in table.stdout
    assert "pull the ref again to resume" in table.stdout

    faults.bytes_per_second = None
    hits_before = len(files.hits)
    resumed: CliResult = cli("models", "pull", url, "--digest", digest_of(model_bytes), env=SMALL_PARTS)  # type: ignore[operator]
    assert resumed.returncode == 0, resumed.stderr
    new_starts = {
        int((hit.range or "bytes=0-").split("=")[1].split("-")[0]) // MIB
        for hit in files.hits[hits_before:]
        if hit.range != "bytes=0-0"
    }
    assert not new_starts & kept  # the digest vouches for the parts on disk
    after: CliResult = cli("downloads", "ls", "--json")  # type: ignore[operator]
    assert [(d["id"], d["state"]) for d in json.loads(after.stdout)] == [(download["id"], "done")]


def test_a_cli_pull_that_cannot_resume_says_why_it_starts_over(
    cli: object, files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    faults = Faults(etag=None, bytes_per_second=MIB)  # nothing vouches for the bytes already on disk
    url = files.add("/m/unvouched.gguf", model_bytes, faults)
    process = pull_process(data_dir, url)
    wait_for(lambda: len(finished_parts(data_dir)) >= 1, "a finished part")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    faults.bytes_per_second = None
    again: CliResult = cli("models", "pull", url, env=SMALL_PARTS)  # type: ignore[operator]
    assert again.returncode == 0, again.stderr
    (note,) = [line for line in again.stderr.splitlines() if line.startswith("note: ")]
    assert "starts over" in note
    assert "--digest" in note


def test_a_pull_of_a_killed_server_is_interrupted_when_the_next_one_starts(
    files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    url = files.add("/m/server-pull.gguf", model_bytes, Faults(bytes_per_second=MIB))
    port = free_port()
    server = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **SMALL_PARTS},
    )
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def ready() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, "the server")
        started = client.post("/api/v1/models/pull", json={"ref": url})
        assert started.status_code == 202, started.text
        download_id = started.json()["id"]
        wait_for(lambda: client.get(f"/api/v1/downloads/{download_id}").json()["bytes_done"] > 0, "bytes")
        client.close()
    finally:
        server.send_signal(signal.SIGKILL)
        server.communicate()
    store = SqliteStore(data_dir / "appliance.db")
    try:
        assert store.get_download(download_id).state == "running"  # type: ignore[union-attr]
    finally:
        store.close()
    runtime = Runtime.open(Settings(data_dir=data_dir))  # what the restarted server opens
    try:
        download = runtime.store.get_download(download_id)
        assert download is not None
        assert (download.state, download.rate_bytes_per_s) == ("interrupted", 0)
    finally:
        runtime.close()


def test_a_killed_cli_pull_shows_interrupted_in_a_running_servers_list(
    server: Server, files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    url = files.add("/m/cli-pull.gguf", model_bytes, Faults(bytes_per_second=MIB))
    process = pull_process(data_dir, url)

    def states() -> list[str]:
        return [d["state"] for d in server.client.get("/api/v1/downloads").json()]

    wait_for(lambda: states() == ["running"], "the CLI's pull running")
    assert states() == ["running"]  # listing leaves a pull whose process runs alone
    process.send_signal(signal.SIGKILL)
    process.communicate()
    (download,) = server.client.get("/api/v1/downloads").json()
    assert (download["state"], download["rate_bytes_per_s"]) == ("interrupted", 0)
    assert server.client.get(f"/api/v1/downloads/{download['id']}").json()["state"] == "interrupted"


def test_a_cancel_from_another_process_stops_the_pull_where_it_runs(
    server: Server, cli: object, files: FileServer, model_bytes: bytes, data_dir: Path
) -> None:
    http = server.client
    by_cli = files.add("/m/by-cli.gguf", model_bytes, Faults(bytes_per_second=MIB))
    process = pull_process(data_dir, by_cli)
    wait_for(lambda: [d["state"] for d in http.get("/api/v1/downloads").json()] == ["running"], "running")
    (download,) = http.get("/api/v1/downloads").json()
    assert http.delete(f"/api/v1/downloads/{download['id']}").json()["state"] == "cancelled"
    _, err = process.communicate(timeout=30)  # the CLI's pull saw its row cancelled by the server
    assert process.returncode != 0
    assert "cancelled" in err

    # the server pulls over 16 connections: about four seconds
    by_server = files.add("/m/by-server.gguf", model_bytes[:-1] + b"\x01", Faults(bytes_per_second=MIB // 8))
    started = http.post("/api/v1/models/pull", json={"ref": by_server})
    assert started.status_code == 202, started.text
    download_id = started.json()["id"]
    cancelled: CliResult = cli("downloads", "cancel", download_id)  # type: ignore[operator]
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"cancelled download {download_id}")
    assert http.get(f"/api/v1/downloads/{download_id}").json()["state"] == "cancelled"
    files.faults["/m/by-server.gguf"].bytes_per_second = None
    # a new download of the ref runs once the cancelled pull has ended and let go of the ref
    http.post("/api/v1/models/pull", json={"ref": by_server})
    wait_for(lambda: http.get("/api/v1/models/by-server").status_code == 200, "the pull after the cancel")
    # its row says done just after the model is registered
    wait_for(
        lambda: [d["state"] for d in http.get("/api/v1/downloads").json()][:2] == ["done", "cancelled"],
        "the new download done, the cancelled one kept",
    )
    again: CliResult = cli("downloads", "cancel", download_id)  # type: ignore[operator]
    assert again.returncode != 0
    assert "is cancelled; nothing runs to cancel" in again.stderr
