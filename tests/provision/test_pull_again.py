"""Pulling a ref again: a known ref uses no network, and a partial resumes or says why it cannot."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import DownloadCancelled
from appliance.provision.service import PullProgress
from appliance.runtime import Runtime
from tests.fileserver import Faults, FileServer
from tests.provision.test_pull import MIB, digest_of, open_runtime


def finished_parts(data_dir: Path) -> set[int]:
    (state,) = (data_dir / "tmp" / "downloads").glob("*.state.json")
    done = json.loads(state.read_text())["done"]
    return {index for index, count in enumerate(done) if count == MIB}


@pytest.mark.parametrize("with_digest", [True, False], ids=["digest", "no-digest"])
def test_without_a_validator_a_partial_resumes_only_when_a_digest_covers_it(
    runtime: Runtime,
    files: FileServer,
    model_bytes: bytes,
    context: Context,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
    with_digest: bool,
) -> None:
    faults = Faults(etag=None, bytes_per_second=MIB // 4)  # no ETag, no Last-Modified
    url = files.add("/no-etag.gguf", model_bytes, faults)
    digest = digest_of(model_bytes) if with_digest else None
    cancel = threading.Event()

    def stop_midway(update: PullProgress) -> None:
        if update.bytes_done >= 4 * MIB + MIB // 4:  # parts 0-3 are done, 4-6 are not
            cancel.set()

    with pytest.raises(DownloadCancelled):
        runtime.provisioner.ensure_present(
            url, context, expected_digest=digest, on_progress=stop_midway, cancel=cancel
        )
    kept = finished_parts(data_dir)
    assert kept

    faults.bytes_per_second = None
    hits_before = len(files.hits)
    updates: list[PullProgress] = []
    with caplog.at_level(logging.INFO, logger="appliance.provision"):
        resolved = runtime.provisioner.ensure_present(
            url, context, expected_digest=digest, on_progress=updates.append
        )
    assert resolved.path.read_bytes() == model_bytes
    starts = {
        int((hit.range or "bytes=0-").split("=")[1].split("-")[0]) // MIB
        for hit in files.hits[hits_before:]
        if hit.range != "bytes=0-0"
    }
    notes = [update.note for update in updates if update.note]
    row = runtime.store.get_download(resolved.download_id or "")
    assert row is not None
    (pull,) = [e for e in runtime.store.list_audit(action="models.pull") if e.outcome == "ok"]
    if with_digest:  # the digest checks the result: the finished parts are kept
        assert not starts & kept
        assert pull.detail["resumed_bytes"] >= len(kept) * MIB
        assert notes == []
        assert row.note is None
    else:  # nothing says the bytes on disk are of the same file: it starts over, and says why
        assert starts == set(range(7))
        assert pull.detail["resumed_bytes"] == 0
        (note,) = notes
        assert "starts over" in note
        assert "no ETag or Last-Modified" in note
        assert "--digest" in note
        assert row.note == note
        assert note in caplog.text


def test_a_ref_pulled_before_under_a_new_name_uses_no_network_and_no_approval(
    data_dir: Path, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    url = files.add("/Known.gguf", model_bytes)
    first = open_runtime(data_dir)
    try:
        pulled = first.provisioner.ensure_present(url, context)  # no digest
    finally:
        first.close()
    requests_before = len(files.hits)
    runtime = open_runtime(data_dir, require_user_approval=True)
    try:
        # in the background: a pull that asked for approval would wait, not hang the test
        again = runtime.provisioner.start(url, context, name="renamed:v2").future.result(timeout=30)
        assert (again.id, again.digest, again.downloaded) == ("renamed:v2", pulled.digest, False)
        assert len(files.hits) == requests_before  # no network
        assert runtime.provisioner.list_downloads(states=("pending",)) == []  # no approval asked
        assert {str(m.name) for m in runtime.models.list_models()} == {"known:latest", "renamed:v2"}
        assert runtime.models.get("renamed:v2").artifacts[0].digest == pulled.digest
        events = [
            e for e in runtime.store.list_audit(action="models.pull") if e.detail.get("network") is False
        ]
        assert [(e.target, e.detail["name"], e.detail["registered_from"]) for e in events] == [
            (url, "renamed:v2", "known:latest")
        ]
        # and again under either name: still no network
        runtime.provisioner.ensure_present(url, context, name="renamed:v2")
        runtime.provisioner.ensure_present(url, context)
        assert len(files.hits) == requests_before
    finally:
        runtime.close()


def test_a_ref_whose_bytes_came_from_another_source_is_not_downloaded_twice(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    original = files.add("/a/same.gguf", model_bytes)
    mirror = files.add("/b/same.gguf", model_bytes)
    runtime.provisioner.ensure_present(original, context)
    runtime.provisioner.ensure_present(mirror, context)  # the same bytes: nothing new is registered
    requests_before = len(files.hits)
    again = runtime.provisioner.ensure_present(mirror, context)
    assert (again.downloaded, again.digest) == (False, digest_of(model_bytes))
    assert len(files.hits) == requests_before
