"""Pulls that wait on another pull of the same ref share how it ends: a cancel, a failure."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import ApplianceError, DownloadCancelled, UnsupportedFormat
from appliance.runtime import Runtime
from tests.fileserver import Faults, FileServer
from tests.provision.test_pull import MIB, _wait_for_state, leftover_partials, wait_until


def probes(files: FileServer, path: str) -> int:
    """Downloads started: each begins with a one-byte probe."""
    return len([hit for hit in files.hits_for(path) if hit.range == "bytes=0-0" and hit.status == 206])


def test_a_cancel_ends_the_download_for_every_waiter(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    url = files.add("/slow.gguf", model_bytes, Faults(bytes_per_second=MIB // 2))
    tickets = [runtime.provisioner.start(url, context) for _ in range(2)]
    running = _wait_for_state(runtime, "running")
    wait_until(lambda: probes(files, "/slow.gguf") == 1, "the download's first request")
    runtime.provisioner.cancel(running.id, Context(actor="admin"))  # type: ignore[attr-defined]
    for ticket in tickets:
        with pytest.raises(DownloadCancelled, match="cancelled") as raised:
            ticket.future.result(timeout=60)
        assert raised.value.code == "download_cancelled"
    downloads = runtime.provisioner.list_downloads()
    assert [(d.id, d.state) for d in downloads] == [(running.id, "cancelled")]  # type: ignore[attr-defined]
    assert probes(files, "/slow.gguf") == 1  # no second download started
    assert runtime.models.list_models() == []
    cancels = runtime.store.list_audit(action="downloads.cancel")
    assert [(e.target, e.outcome) for e in cancels] == [(running.id, "ok")]  # type: ignore[attr-defined]


def test_a_pull_after_a_cancel_is_a_new_download(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    url = files.add("/again.gguf", model_bytes, Faults(bytes_per_second=MIB))
    ticket = runtime.provisioner.start(url, context)
    running = _wait_for_state(runtime, "running")
    runtime.provisioner.cancel(running.id, context)  # type: ignore[attr-defined]
    with pytest.raises(DownloadCancelled):
        ticket.future.result(timeout=60)
    files.faults["/again.gguf"].bytes_per_second = None
    resolved = runtime.provisioner.ensure_present(url, context)
    assert resolved.download_id != running.id  # type: ignore[attr-defined]
    states = {d.id: d.state for d in runtime.provisioner.list_downloads()}
    assert states == {running.id: "cancelled", resolved.download_id: "done"}  # type: ignore[attr-defined]


def test_a_file_that_is_not_a_model_is_fetched_once_and_refused_from_its_first_bytes(
    runtime: Runtime, files: FileServer, context: Context, data_dir: Path
) -> None:
    junk = b"<!doctype html><title>not a model</title>" + bytes(6 * MIB)
    # each part takes a second; the first answer, a 503, holds the download back while all eight start
    url = files.add("/junk.gguf", junk, Faults(bytes_per_second=MIB, statuses=[503]))
    outcomes: list[object] = []

    def pull() -> None:
        try:
            outcomes.append(runtime.provisioner.ensure_present(url, context))
        except ApplianceError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 8
    assert all(isinstance(outcome, UnsupportedFormat) for outcome in outcomes), outcomes
    assert {outcome.code for outcome in outcomes} == {"unsupported_format"}  # type: ignore[attr-defined]
    assert probes(files, "/junk.gguf") == 1  # one download for all eight
    assert len(files.body_requests("/junk.gguf")) <= 4  # the first wave of parts, not all seven
    assert leftover_partials(data_dir) == []  # nothing of it is kept
    (download,) = runtime.provisioner.list_downloads()
    assert (download.state, download.error_code) == ("failed", "unsupported_format")
    assert runtime.models.list_models() == []


def test_a_server_that_ignores_range_is_refused_from_the_first_bytes_too(
    runtime: Runtime, files: FileServer, context: Context, data_dir: Path
) -> None:
    junk = b"PK\x03\x04 a zip, not a model" + bytes(4 * MIB)
    url = files.add("/junk.zip", junk, Faults(ignore_range=True, bytes_per_second=MIB))
    with pytest.raises(UnsupportedFormat, match="neither GGUF nor safetensors"):
        runtime.provisioner.ensure_present(url, context)
    assert leftover_partials(data_dir) == []
