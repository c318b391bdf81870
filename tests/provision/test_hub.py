"""``hf:`` refs against a hub-compatible server on loopback (the endpoints huggingface_hub calls)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import CredentialsRefused, DigestMismatch, DigestRequired, RemoteNotFound
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.fileserver import FileServer, serve_files
from tests.tiny_model import write_llama_gguf

COMMIT = "c0ffee" * 6 + "abcd"
TOKEN = "hf_secret_token_for_tests"


def safetensors(values: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * values)


@pytest.fixture
def hub() -> Iterator[FileServer]:
    with serve_files() as server:
        yield server


def publish(hub: FileServer, repo: str, files: dict[str, bytes], *, lfs: set[str], lie: bool = False) -> None:
    """Serve ``repo`` at COMMIT: its metadata (the hub's sha256 for LFS files) and its files."""
    siblings = []
    for name, content in files.items():
        blob_id = hashlib.sha1(b"blob %d\0" % len(content) + (b"tampered" if lie else content)).hexdigest()
        sibling: dict[str, object] = {"rfilename": name, "size": len(content), "blobId": blob_id}
        if name in lfs:
            digest = hashlib.sha256(b"other content" if lie else content).hexdigest()
            sibling["lfs"] = {"sha256": digest, "size": len(content), "pointerSize": 130}
        siblings.append(sibling)
        hub.add(f"/{repo}/resolve/{COMMIT}/{name}", content)
    hub.add_json(f"/api/models/{repo}/revision/main", {"id": repo, "sha": COMMIT, "siblings": siblings})


@pytest.fixture
def runtime(data_dir: Path, hub: FileServer) -> Iterator[Runtime]:
    settings = Settings(data_dir=data_dir, models={"download": {"hf_endpoint": hub.url, "hf_token": TOKEN}})
    opened = Runtime.open(settings)
    yield opened
    opened.close()


def test_one_file_is_verified_with_the_hubs_digest(
    runtime: Runtime, hub: FileServer, tmp_path: Path, context: Context
) -> None:
    content = write_llama_gguf(tmp_path / "m.gguf").read_bytes()
    publish(hub, "org/tiny-repo", {"Tiny.Q8_0.gguf": content, "README.md": b"# tiny"}, lfs={"Tiny.Q8_0.gguf"})

    resolved = runtime.provisioner.ensure_present("hf:org/tiny-repo/Tiny.Q8_0.gguf", context)
    assert (resolved.id, resolved.verification) == ("tiny.q8_0:latest", "source")
    assert resolved.path.read_bytes() == content
    fetched = [hit for hit in hub.hits if "/resolve/" in hit.path]
    assert {hit.path for hit in fetched} == {f"/org/tiny-repo/resolve/{COMMIT}/Tiny.Q8_0.gguf"}
    assert {hit.authorization for hit in hub.hits} == {f"Bearer {TOKEN}"}

    (event,) = runtime.store.list_audit(action="models.pull")
    (download,) = runtime.provisioner.list_downloads()
    assert TOKEN not in json.dumps(event.detail) + repr(download) + repr(runtime.settings)


def test_the_token_stays_with_the_hub_when_it_redirects_to_another_host(
    runtime: Runtime, hub: FileServer, tmp_path: Path, context: Context
) -> None:
    """The hub hands large files to another host (its CDN), as huggingface.co does: the token goes
    to the hub only, not with the Range requests for the file's parts."""
    content = write_llama_gguf(tmp_path / "m.gguf", padding_bytes=3 * 1024 * 1024).read_bytes()
    publish(hub, "org/cdn-repo", {"Big.gguf": content}, lfs={"Big.gguf"})
    resolve = f"/org/cdn-repo/resolve/{COMMIT}/Big.gguf"
    hub.add("/cdn/blob", content)
    hub.redirects[resolve] = f"http://localhost:{hub.url.rsplit(':', 1)[1]}/cdn/blob"

    resolved = runtime.provisioner.ensure_present("hf:org/cdn-repo/Big.gguf", context)

    assert resolved.path.read_bytes() == content
    assert len(hub.body_requests("/cdn/blob")) > 1  # the parts, fetched from the other host
    assert {hit.authorization for hit in hub.hits_for("/cdn/blob")} == {None}
    assert {hit.authorization for hit in hub.hits_for(resolve)} == {f"Bearer {TOKEN}"}


def test_a_whole_repo_is_one_model_with_every_file(
    runtime: Runtime, hub: FileServer, context: Context
) -> None:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b'{"version": "1.0"}',
        "model-00001-of-00002.safetensors": safetensors(1000),
        "model-00002-of-00002.safetensors": safetensors(2000),
    }
    publish(hub, "org/Small-Model-1.5", files, lfs={name for name in files if name.endswith(".safetensors")})

    resolved = runtime.provisioner.ensure_present("hf:org/Small-Model-1.5", context, strict=True)

    model = runtime.models.get("small-model-1.5")
    assert sorted(a.filename for a in model.artifacts) == sorted(files)
    assert model.formats == ["file", "safetensors"]
    digests = sorted(f"sha256:{hashlib.sha256(content).hexdigest()}" for content in files.values())
    assert resolved.digest == "sha256:" + hashlib.sha256("\n".join(digests).encode()).hexdigest()
    assert resolved.verification == "source"  # LFS files by sha256, config and tokenizer by git blob id
    assert resolved.size == sum(len(content) for content in files.values())
    assert resolved.path.read_bytes() == files["model-00001-of-00002.safetensors"]

    requests = len(hub.hits)
    again = runtime.provisioner.ensure_present("hf:org/Small-Model-1.5", context)
    assert (again.downloaded, again.digest) == (False, resolved.digest)
    pinned = runtime.provisioner.ensure_present(
        "hf:org/Small-Model-1.5", context, expected_digest=resolved.digest
    )
    assert pinned.downloaded is False
    renamed = runtime.provisioner.ensure_present("hf:org/Small-Model-1.5", context, name="small:copy")
    assert (renamed.id, renamed.digest, renamed.downloaded) == ("small:copy", resolved.digest, False)
    assert sorted(a.filename for a in runtime.models.get("small:copy").artifacts) == sorted(files)
    assert len(hub.hits) == requests


def test_a_repo_pull_that_fails_on_one_file_keeps_the_finished_ones(
    runtime: Runtime, hub: FileServer, context: Context
) -> None:
    files = {"a.safetensors": safetensors(500), "b.safetensors": safetensors(700), "config.json": b"{}"}
    publish(hub, "org/flaky-repo", files, lfs={"a.safetensors", "b.safetensors"})
    missing = f"/org/flaky-repo/resolve/{COMMIT}/config.json"
    content = hub.files.pop(missing)
    with pytest.raises(RemoteNotFound):
        runtime.provisioner.ensure_present("hf:org/flaky-repo", context)
    assert runtime.models.list_models() == []
    hub.files[missing] = content
    runtime.provisioner.ensure_present("hf:org/flaky-repo", context)
    for name in ("a.safetensors", "b.safetensors"):
        # fetched once; the second pull only probed it and hashed what was already on disk
        assert len(hub.body_requests(f"/org/flaky-repo/resolve/{COMMIT}/{name}")) == 1
    assert sorted(a.filename for a in runtime.models.get("flaky-repo").artifacts) == sorted(files)


def test_content_that_differs_from_the_hubs_digest_is_not_kept(
    runtime: Runtime, hub: FileServer, tmp_path: Path, context: Context, data_dir: Path
) -> None:
    content = write_llama_gguf(tmp_path / "m.gguf").read_bytes()
    publish(hub, "org/liar", {"m.gguf": content}, lfs={"m.gguf"}, lie=True)
    with pytest.raises(DigestMismatch, match="the source says"):
        runtime.provisioner.ensure_present("hf:org/liar/m.gguf", context)
    assert runtime.models.list_models() == []
    assert list((data_dir / "blobs" / "sha256").iterdir()) == []


def test_a_small_file_that_differs_from_its_git_blob_id_is_not_kept(
    runtime: Runtime, hub: FileServer, context: Context, data_dir: Path
) -> None:
    publish(
        hub,
        "org/bad-config",
        {"config.json": b'{"a": 1}', "w.safetensors": safetensors(10)},
        lfs=set(),
        lie=True,
    )
    with pytest.raises(DigestMismatch, match="git blob id"):
        runtime.provisioner.ensure_present("hf:org/bad-config", context)
    assert runtime.models.list_models() == []
    assert list((data_dir / "blobs" / "sha256").iterdir()) == []


def test_strict_refuses_a_repo_whose_files_have_no_id(
    runtime: Runtime, hub: FileServer, context: Context
) -> None:
    hub.add_json(
        "/api/models/org/bare/revision/main",
        {"id": "org/bare", "sha": COMMIT, "siblings": [{"rfilename": "config.json"}]},
    )
    with pytest.raises(DigestRequired):
        runtime.provisioner.ensure_present("hf:org/bare", context, strict=True)


def test_missing_repos_and_files_are_clear_errors(
    runtime: Runtime, hub: FileServer, context: Context
) -> None:
    hub.add_json(
        "/api/models/org/gone/revision/main",
        {"error": "nope"},
        status=404,
        headers={"X-Error-Code": "RepoNotFound"},
    )
    with pytest.raises(RemoteNotFound, match="has no repo org/gone at revision main"):
        runtime.provisioner.ensure_present("hf:org/gone", context)
    publish(hub, "org/there", {"config.json": b"{}"}, lfs=set())
    with pytest.raises(RemoteNotFound, match=r"has no file weights\.gguf"):
        runtime.provisioner.ensure_present("hf:org/there/weights.gguf", context)
    # a pull that fails on the hub's metadata is a failed download like any other, with its error
    failed = [(d.ref, d.state, d.error_code) for d in runtime.provisioner.list_downloads()]
    assert failed == [
        ("hf:org/there/weights.gguf", "failed", "remote_not_found"),
        ("hf:org/gone", "failed", "remote_not_found"),
    ]


@pytest.mark.parametrize("error_code", ["GatedRepo", None])
def test_a_token_the_hub_refuses_is_a_clear_error(
    runtime: Runtime, hub: FileServer, context: Context, error_code: str | None
) -> None:
    hub.add_json(
        "/api/models/org/private/revision/main",
        {"error": "Access to model org/private is restricted."},
        status=403,
        headers={"X-Error-Code": error_code} if error_code else {},
    )
    with pytest.raises(CredentialsRefused, match="refused the token sent") as raised:
        runtime.provisioner.ensure_present("hf:org/private", context)
    assert "models.download.hf_token" in raised.value.hint
    (download,) = runtime.provisioner.list_downloads()
    assert (download.state, download.error_code) == ("failed", "credentials_refused")
