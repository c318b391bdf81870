"""Pulling over HTTP from a real loopback server with fault injection: ``ensure_present`` end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import (
    CacheFull,
    DigestMismatch,
    DigestRequired,
    DiskFull,
    DownloadDenied,
    DownloadFailed,
    DownloadNotFound,
    DownloadNotPending,
    Offline,
    RemoteNotFound,
    SchemeNotSupported,
    SourceNotAllowed,
)
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.fileserver import Faults, FileServer

MIB = 1024 * 1024


def digest_of(content: bytes) -> str:
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


def open_runtime(data_dir: Path, **download: object) -> Runtime:
    settings = Settings(
        data_dir=data_dir,
        models={"download": {"part_bytes": MIB, "connections": 4, "stall_timeout": 1.0, **download}},
    )
    return Runtime.open(settings)


def leftover_partials(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "tmp" / "downloads").iterdir() if not p.name.endswith(".lock"))


def test_a_pull_is_verified_registered_and_the_next_one_uses_no_network(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context, data_dir: Path
) -> None:
    url = files.add("/models/Tiny-Chat.gguf", model_bytes)
    resolved = runtime.provisioner.ensure_present(url, context, expected_digest=digest_of(model_bytes))

    assert (resolved.id, resolved.downloaded, resolved.verification) == ("tiny-chat:latest", True, "expected")
    assert resolved.path.read_bytes() == model_bytes
    model = runtime.models.get("tiny-chat")
    assert model.capabilities["architecture"] == "llama"
    assert model.artifacts[0].source_uri == url
    assert len(files.body_requests("/models/Tiny-Chat.gguf")) == 7  # 6.4 MiB in 1 MiB parts
    assert runtime.store.get_download(resolved.download_id or "").state == "done"  # type: ignore[union-attr]

    requests_before = len(files.hits)
    again = runtime.provisioner.ensure_present(url, context)
    assert (again.downloaded, again.digest, again.verification) == (False, resolved.digest, "present")
    assert len(files.hits) == requests_before

    handoff = json.loads((data_dir / "runtime" / "engines" / "llamacpp.json").read_text())
    assert handoff["model"] == {
        "id": url,
        "name": "tiny-chat:latest",
        "path": str(resolved.path),
        "digest": resolved.digest,
    }
    provenance = (data_dir / "runtime" / "provenance" / "models.jsonl").read_text().splitlines()
    assert json.loads(provenance[-1])["digest"] == resolved.digest
    assert leftover_partials(data_dir) == []
    pulls = runtime.store.list_audit(action="models.pull")
    assert [(event.outcome, event.bytes) for event in pulls] == [("ok", len(model_bytes))]


def test_without_a_digest_the_pull_is_kept_and_flagged_unverified(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    url = files.add("/tiny.gguf", model_bytes)
    resolved = runtime.provisioner.ensure_present(url, context, name="mine:v1")
    assert (resolved.id, resolved.verification, resolved.digest) == (
        "mine:v1",
        "unverified",
        digest_of(model_bytes),
    )
    (event,) = runtime.store.list_audit(action="models.pull")
    assert event.detail["verification"] == "unverified"
    assert "no digest" in event.detail["warning"]


def test_a_server_that_ignores_range_gets_one_stream(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    url = files.add("/plain.gguf", model_bytes, Faults(ignore_range=True))
    resolved = runtime.provisioner.ensure_present(url, context, expected_digest=digest_of(model_bytes))
    assert resolved.path.read_bytes() == model_bytes
    assert len(files.hits_for("/plain.gguf")) == 1  # the probe's 200 was the whole body


@pytest.mark.parametrize(
    "faults",
    [
        Faults(drop_after=300_000, faulty_responses=3),
        Faults(stall_after=200_000, stall_seconds=4, faulty_responses=2),
        Faults(statuses=[500, 503, 502]),
    ],
    ids=["dropped-connection", "stall", "5xx-then-success"],
)
def test_faults_are_retried_and_the_file_still_arrives_whole(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context, faults: Faults
) -> None:
    url = files.add("/flaky.gguf", model_bytes, faults)
    resolved = runtime.provisioner.ensure_present(url, context, expected_digest=digest_of(model_bytes))
    assert resolved.path.read_bytes() == model_bytes
    if faults.drop_after is not None:
        # a dropped part resumes from the byte it reached, not from the start of the part
        starts = {
            int(hit.range.split("=")[1].split("-")[0])
            for hit in files.body_requests("/flaky.gguf")
            if hit.range
        }
        assert any(start % MIB != 0 for start in starts)


def test_a_server_that_keeps_failing_ends_in_a_clear_error_and_gc_clears_the_partial(
    data_dir: Path, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    runtime = open_runtime(data_dir, retries=1)
    try:
        url = files.add("/broken.gguf", model_bytes, Faults(drop_after=0, faulty_responses=1000))
        with pytest.raises(DownloadFailed, match="gave up after 2 tries"):
            runtime.provisioner.ensure_present(url, context)
        assert runtime.models.list_models() == []
        assert list((data_dir / "blobs" / "sha256").iterdir()) == []
        (download,) = runtime.provisioner.list_downloads()
        assert download.state == "failed"
        assert "gave up" in (download.error or "")
        assert len(leftover_partials(data_dir)) == 2  # the partial and its state, to resume

        report = runtime.models.gc(context)
        assert report.stale_partials == 1
        assert leftover_partials(data_dir) == []
    finally:
        runtime.close()


def test_a_missing_file_is_a_clear_error_that_changes_nothing(
    runtime: Runtime, files: FileServer, context: Context, data_dir: Path
) -> None:
    with pytest.raises(RemoteNotFound, match="404"):
        runtime.provisioner.ensure_present(f"{files.url}/nothing.gguf", context)
    assert runtime.models.list_models() == []
    assert [d.state for d in runtime.provisioner.list_downloads()] == ["failed"]
    assert [e.outcome for e in runtime.store.list_audit(action="models.pull")] == ["error"]


def test_corrupted_bytes_fail_verification_and_leave_nothing(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context, data_dir: Path
) -> None:
    url = files.add("/corrupt.gguf", model_bytes, Faults(corrupt=True))
    with pytest.raises(DigestMismatch, match="expected digest"):
        runtime.provisioner.ensure_present(url, context, expected_digest=digest_of(model_bytes))
    assert runtime.models.list_models() == []
    assert list((data_dir / "blobs" / "sha256").iterdir()) == []
    assert leftover_partials(data_dir) == []


def test_the_cache_budget_is_checked_before_the_body(
    data_dir: Path, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    settings = Settings(
        data_dir=data_dir, models={"cache": {"max_bytes": MIB}, "download": {"part_bytes": MIB}}
    )
    runtime = Runtime.open(settings)
    try:
        url = files.add("/big.gguf", model_bytes)
        with pytest.raises(CacheFull):
            runtime.provisioner.ensure_present(url, context)
        assert files.body_requests("/big.gguf") == []
    finally:
        runtime.close()


def test_a_download_larger_than_the_free_space_is_refused_before_the_body(
    tmp_path: Path, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        runtime = open_runtime(small / "data")
        try:
            url = files.add("/too-big.gguf", model_bytes)
            with pytest.raises(DiskFull, match="not enough space"):
                runtime.provisioner.ensure_present(url, context)
            assert files.body_requests("/too-big.gguf") == []
            assert runtime.models.list_models() == []
        finally:
            runtime.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_downloads_beyond_max_parallel_wait_for_a_slot(
    data_dir: Path, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    runtime = open_runtime(data_dir, max_parallel=1)
    try:
        first = files.add("/first.gguf", model_bytes, Faults(bytes_per_second=MIB // 2))  # about 3 s
        second = files.add("/second.gguf", model_bytes[:-1] + b"\x01")
        events: list[tuple[str, str]] = []  # (ref, state) in the order the pulls report them

        def pull(url: str) -> None:
            runtime.provisioner.ensure_present(
                url, context, on_progress=lambda update: events.append((url, update.state))
            )

        threads = [threading.Thread(target=pull, args=(url,)) for url in (first, second)]
        threads[0].start()
        _wait_for_state(runtime, "running")
        threads[1].start()
        wait_until(lambda: (second, "queued") in events, "the second pull is queued")
        waiting = {d.ref: d.state for d in runtime.provisioner.list_downloads()}
        assert waiting == {first: "running", second: "queued"}  # the second waits for the slot
        assert files.hits_for("/second.gguf") == []
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(d.state for d in runtime.provisioner.list_downloads()) == ["done", "done"]
        # the second ran only once the first had given its slot back
        assert events.index((first, "done")) < events.index((second, "running"))
    finally:
        runtime.close()


def test_offline_mode_makes_no_outbound_call(data_dir: Path, files: FileServer, model_bytes: bytes) -> None:
    runtime = Runtime.open(Settings(data_dir=data_dir, offline=True))
    try:
        url = files.add("/tiny.gguf", model_bytes)
        with pytest.raises(Offline, match="offline mode is on") as raised:
            runtime.provisioner.ensure_present(url, Context(actor="test"))
        assert "APPLIANCE_OFFLINE" in raised.value.hint
        assert files.hits == []
    finally:
        runtime.close()


def test_a_stored_preference_never_overrides_offline_mode(
    data_dir: Path, files: FileServer, model_bytes: bytes
) -> None:
    runtime = Runtime.open(Settings(data_dir=data_dir, offline=True))
    try:
        runtime.store.set_preference("offline", False, actor="admin")
        with pytest.raises(Offline):
            runtime.provisioner.ensure_present(files.add("/tiny.gguf", model_bytes), Context(actor="test"))
        assert files.hits == []
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("download", "message"),
    [
        ({"allowed_sources": ["https"]}, "not in models.download.allowed_sources"),
        ({"denied_sources": ["http://127.0.0.1:*"]}, "denied by models.download.denied_sources"),
    ],
)
def test_sources_outside_the_policy_are_refused_before_any_call(
    data_dir: Path, files: FileServer, model_bytes: bytes, download: dict[str, object], message: str
) -> None:
    runtime = open_runtime(data_dir, **download)
    try:
        with pytest.raises(SourceNotAllowed, match=message):
            runtime.provisioner.ensure_present(files.add("/tiny.gguf", model_bytes), Context(actor="test"))
        assert files.hits == []
    finally:
        runtime.close()


def test_a_redirect_is_held_to_the_policy(data_dir: Path, files: FileServer, model_bytes: bytes) -> None:
    port = files.url.rsplit(":", 1)[1]
    files.add("/real.gguf", model_bytes)
    files.redirects["/moved.gguf"] = f"http://localhost:{port}/real.gguf"
    runtime = open_runtime(data_dir, denied_sources=["http://localhost:*"])
    try:
        with pytest.raises(SourceNotAllowed, match="redirected to http://localhost"):
            runtime.provisioner.ensure_present(f"{files.url}/moved.gguf", Context(actor="test"))
        assert files.hits_for("/real.gguf") == []
        assert runtime.models.list_models() == []
    finally:
        runtime.close()
    allowed = open_runtime(data_dir)
    try:  # without the deny entry the same redirect is followed
        resolved = allowed.provisioner.ensure_present(f"{files.url}/moved.gguf", Context(actor="test"))
        assert resolved.path.read_bytes() == model_bytes
    finally:
        allowed.close()


def test_an_admin_preference_overrides_the_policy_setting(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    runtime.store.set_preference("models.download.allowed_sources", ["https://mirror.lan"], actor="admin")
    with pytest.raises(SourceNotAllowed):
        runtime.provisioner.ensure_present(files.add("/tiny.gguf", model_bytes), context)


def test_strict_without_any_digest_is_refused_before_the_download(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    with pytest.raises(DigestRequired):
        runtime.provisioner.ensure_present(files.add("/tiny.gguf", model_bytes), context, strict=True)
    assert files.hits == []


@pytest.mark.parametrize(
    ("ref", "module"), [("hf:org/repo/m.gguf", "huggingface_hub"), ("s3://bucket/m.gguf", "botocore")]
)
def test_a_scheme_whose_extra_is_not_installed_says_which_to_install(
    runtime: Runtime, context: Context, monkeypatch: pytest.MonkeyPatch, ref: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what a missing package looks like to an import
    with pytest.raises(SchemeNotSupported, match="is not installed") as raised:
        runtime.provisioner.ensure_present(ref, context)
    assert "pip install 'appliance[" in raised.value.hint


def test_twenty_concurrent_pulls_of_one_ref_make_one_download(
    runtime: Runtime, files: FileServer, model_bytes: bytes, context: Context
) -> None:
    url = files.add("/popular.gguf", model_bytes, Faults(bytes_per_second=20 * MIB))
    results: list[object] = []

    def pull() -> None:
        try:
            results.append(runtime.provisioner.ensure_present(url, context).digest)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [digest_of(model_bytes)] * 20
    probes = [hit for hit in files.hits_for("/popular.gguf") if hit.range == "bytes=0-0"]
    assert len(probes) == 1
    assert len(files.body_requests("/popular.gguf")) == 7


def test_a_pending_download_waits_for_approval(data_dir: Path, files: FileServer, model_bytes: bytes) -> None:
    runtime = open_runtime(data_dir, require_user_approval=True)
    admin = open_runtime(data_dir)
    try:
        url = files.add("/needs-ok.gguf", model_bytes)
        outcome: list[object] = []
        waiting = threading.Thread(
            target=lambda: outcome.append(runtime.provisioner.ensure_present(url, Context(actor="user")))
        )
        waiting.start()
        pending = _wait_for_state(admin, "pending")
        assert files.hits == []  # nothing is fetched before approval
        with pytest.raises(DownloadNotFound):
            admin.provisioner.decide("nope", approve=True, context=Context(actor="admin"))
        admin.provisioner.decide(pending.id, approve=True, context=Context(actor="admin"))
        waiting.join(timeout=60)
        assert len(outcome) == 1
        assert outcome[0].digest == digest_of(model_bytes)  # type: ignore[attr-defined]
        with pytest.raises(DownloadNotPending, match="is done"):
            admin.provisioner.decide(pending.id, approve=False, context=Context(actor="admin"))
        events = [
            (e.action, e.outcome) for e in admin.store.list_audit() if e.action.startswith("downloads.")
        ]
        assert sorted(events) == [
            ("downloads.approve", "error"),  # the unknown id
            ("downloads.approve", "ok"),
            ("downloads.deny", "error"),  # no longer pending
            ("downloads.request", "ok"),
        ]
    finally:
        runtime.close()
        admin.close()


def test_a_denied_download_fails_the_waiting_pull(
    data_dir: Path, files: FileServer, model_bytes: bytes
) -> None:
    runtime = open_runtime(data_dir, require_user_approval=True)
    try:
        url = files.add("/refused.gguf", model_bytes)
        outcome: list[object] = []

        def pull() -> None:
            try:
                runtime.provisioner.ensure_present(url, Context(actor="user"))
            except DownloadDenied as exc:
                outcome.append(exc)

        waiting = threading.Thread(target=pull)
        waiting.start()
        pending = _wait_for_state(runtime, "pending")
        runtime.provisioner.decide(pending.id, approve=False, context=Context(actor="admin"))
        waiting.join(timeout=60)
        assert len(outcome) == 1
        assert "denied by admin" in str(outcome[0])
        assert files.hits == []
        assert runtime.models.list_models() == []
    finally:
        runtime.close()


def wait_until(condition: Callable[[], object], what: str) -> None:
    """Poll ``condition`` until it holds, for at most 30 seconds."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting: {what}")
        time.sleep(0.02)


def _wait_for_state(runtime: Runtime, state: str) -> object:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = runtime.provisioner.list_downloads(states=(state,))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no download reached {state}")
