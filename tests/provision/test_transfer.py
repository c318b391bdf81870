"""The download engine on its own, against a real loopback file server: the body of a part read
straight from a plain socket (slow links, cancels) and through httpx over TLS."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import threading
from pathlib import Path

import httpx

from appliance.errors import DownloadCancelled
from appliance.provision.transfer import RemoteFile, Transfer, TransferResult
from appliance.settings import DownloadSettings, Settings
from appliance.tls import init_tls
from tests.fileserver import Faults, FileServer, serve_files

MIB = 1024 * 1024


def start_transfer(
    url: str, partial: Path, *, verify: ssl.SSLContext | bool = True, **options: object
) -> tuple[Transfer, httpx.Client, int]:
    settings = DownloadSettings.model_validate({"part_bytes": MIB, "stall_timeout": 1.0, **options})
    client = httpx.Client(timeout=httpx.Timeout(30.0, read=settings.stall_timeout), verify=verify)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
    return Transfer(client, RemoteFile(url, partial.name), partial, settings), client, fd


def fetch(
    url: str, partial: Path, *, verify: ssl.SSLContext | bool = True, **options: object
) -> TransferResult:
    transfer, client, fd = start_transfer(url, partial, verify=verify, **options)
    try:
        return transfer.run(fd)
    finally:
        client.close()
        os.close(fd)


def test_a_link_slower_than_the_low_water_mark_is_not_taken_for_a_stall(
    files: FileServer, tmp_path: Path
) -> None:
    # 150 kB/s: a second brings far less than the 256 KiB a fast reader waits for, and the stall
    # limit is one second, yet bytes keep coming, so the part is never dropped and asked again
    content = os.urandom(400_000)
    url = files.add("/slow.bin", content, Faults(bytes_per_second=150_000))
    result = fetch(url, tmp_path / "slow.partial", connections=1)
    assert result.digest == f"sha256:{hashlib.sha256(content).hexdigest()}"
    assert (tmp_path / "slow.partial").read_bytes() == content
    assert len(files.body_requests("/slow.bin")) == 1


def test_a_cancel_stops_parts_that_wait_on_a_slow_link_and_keeps_their_bytes(
    files: FileServer, tmp_path: Path
) -> None:
    content = os.urandom(2 * MIB)
    url = files.add("/crawl.bin", content, Faults(bytes_per_second=64_000))
    partial = tmp_path / "crawl.partial"
    transfer, client, fd = start_transfer(url, partial, connections=2)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            transfer.run(fd)
        except BaseException as exc:  # what the test asserts on
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        threading.Event().wait(1.0)
        transfer.cancel.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the cancel did not stop the parts"
    finally:
        transfer.cancel.set()
        thread.join()
        client.close()
        os.close(fd)
    assert [type(exc) for exc in outcome] == [DownloadCancelled]
    done = json.loads(transfer.state_path.read_text())["done"]
    assert sum(done) > 0  # what arrived stays, to resume
    kept = partial.read_bytes()
    assert all(
        kept[index * MIB : index * MIB + count] == content[index * MIB : index * MIB + count]
        for index, count in enumerate(done)
    )


def test_over_tls_the_parts_arrive_whole_through_httpx(tmp_path: Path) -> None:
    tls = init_tls(Settings(data_dir=tmp_path / "data"), [])
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(tls.server.cert, tls.server.key)
    trusted = ssl.create_default_context(cafile=str(tls.ca_cert))
    content = os.urandom(3 * MIB + 12_345)
    with serve_files(ssl_context=server_side) as files:
        url = files.add("/secure.bin", content).replace("http://", "https://")
        result = fetch(url, tmp_path / "secure.partial", verify=trusted, connections=2)
        assert len(files.body_requests("/secure.bin")) == 4  # four 1 MiB parts, fetched in parallel
    assert result.digest == f"sha256:{hashlib.sha256(content).hexdigest()}"
    assert (tmp_path / "secure.partial").read_bytes() == content
