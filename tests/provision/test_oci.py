"""``oci://`` refs against a real OCI distribution registry (Debian's docker-registry) on loopback."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from appliance.audit import Context
from appliance.errors import CredentialsRefused, RemoteNotFound, SourceNotAllowed
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.conftest import free_port
from tests.fileserver import FileServer, serve_files
from tests.tiny_model import write_llama_gguf

OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@contextmanager
def serving_registry(root: Path, *, readonly: bool = False) -> Iterator[str]:
    """docker-registry serving on a free loopback port; yields its host:port. A read-only one
    serves pulls and refuses every upload."""
    binary = shutil.which("docker-registry")
    assert binary is not None, "docker-registry is installed by .ci/run (Debian's docker-registry package)"
    port = free_port()
    config = root / "registry.yml"
    storage: dict[str, object] = {"filesystem": {"rootdirectory": str(root / "registry")}}
    if readonly:
        storage["maintenance"] = {"readonly": {"enabled": True}}
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": storage,
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://{address}/v2/").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"docker-registry did not start: {process.communicate()[1]!r}")
        time.sleep(0.1)
    yield address
    process.terminate()
    process.communicate(timeout=10)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    with serving_registry(tmp_path) as address:
        yield address


def push(address: str, repository: str, tag: str, layers: list[tuple[str, bytes, dict[str, str]]]) -> str:
    """Push blobs and a manifest the way `ollama push` does; returns the manifest's digest."""
    base = f"http://{address}/v2/{repository}"

    def upload(content: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(content).hexdigest()}"
        started = httpx.post(f"{base}/blobs/uploads/")
        location = httpx.URL(f"http://{address}").join(started.headers["location"])
        httpx.put(location.copy_merge_params({"digest": digest}), content=content).raise_for_status()
        return digest

    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": upload(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": media_type,
                "digest": upload(content),
                "size": len(content),
                **({"annotations": notes} if notes else {}),
            }
            for media_type, content, notes in layers
        ],
    }
    put = httpx.put(
        f"{base}/manifests/{tag}", content=json.dumps(manifest), headers={"Content-Type": DOCKER_MANIFEST}
    )
    put.raise_for_status()
    return put.headers["docker-content-digest"]


def open_runtime(data_dir: Path, address: str, **download: object) -> Runtime:
    settings = Settings(data_dir=data_dir, models={"download": {"oci_plain_http": [address], **download}})
    return Runtime.open(settings)


@pytest.fixture
def gguf(tmp_path: Path) -> bytes:
    return write_llama_gguf(tmp_path / "m.gguf", padding_bytes=2 * 1024 * 1024).read_bytes()


def test_an_ollama_style_model_is_pulled_by_tag_and_by_digest(
    registry: str, gguf: bytes, data_dir: Path, context: Context
) -> None:
    manifest_digest = push(
        registry,
        "library/tiny",
        "q8",
        [(OLLAMA_MODEL, gguf, {}), (OLLAMA_TEMPLATE, b"{{ .Prompt }}", {})],
    )
    runtime = open_runtime(data_dir, registry)
    try:
        resolved = runtime.provisioner.ensure_present(f"oci://{registry}/library/tiny:q8", context)
        assert (resolved.id, resolved.verification) == ("tiny:q8", "source")
        assert resolved.path.read_bytes() == gguf
        assert runtime.models.get("tiny:q8").capabilities["architecture"] == "llama"

        pinned = runtime.provisioner.ensure_present(
            f"oci://{registry}/library/tiny@{manifest_digest}", context, name="tiny:pinned"
        )
        assert (pinned.digest, pinned.downloaded) == (
            resolved.digest,
            True,
        )  # same blob, now under a second name
        assert len(list((data_dir / "blobs" / "sha256").iterdir())) == 1
    finally:
        runtime.close()


def test_a_titled_layer_of_a_plain_oci_artifact_is_the_model(
    registry: str, gguf: bytes, data_dir: Path, context: Context
) -> None:
    push(
        registry,
        "models/plain",
        "v1",
        [("application/octet-stream", gguf, {"org.opencontainers.image.title": "Plain-Model.gguf"})],
    )
    runtime = open_runtime(data_dir, registry)
    try:
        resolved = runtime.provisioner.ensure_present(f"oci://{registry}/models/plain:v1", context)
        assert resolved.id == "plain:v1"
        assert runtime.models.get("plain:v1").artifacts[0].filename == "Plain-Model.gguf"
    finally:
        runtime.close()


def test_missing_tags_and_manifests_without_a_model_are_clear_errors(
    registry: str, data_dir: Path, context: Context
) -> None:
    push(registry, "library/notes", "latest", [("text/plain", b"just notes", {})])
    runtime = open_runtime(data_dir, registry)
    try:
        with pytest.raises(RemoteNotFound, match="has no library/notes nothere"):
            runtime.provisioner.ensure_present(f"oci://{registry}/library/notes:nothere", context)
        with pytest.raises(RemoteNotFound, match="has no model layer"):
            runtime.provisioner.ensure_present(f"oci://{registry}/library/notes", context)
        assert runtime.models.list_models() == []
        # a pull that fails on its manifest is a failed download like any other, with its error
        failed = [(d.ref, d.state, d.error_code) for d in runtime.provisioner.list_downloads()]
        assert failed == [
            (f"oci://{registry}/library/notes:latest", "failed", "remote_not_found"),
            (f"oci://{registry}/library/notes:nothere", "failed", "remote_not_found"),
        ]
        assert "has no model layer" in (runtime.provisioner.list_downloads()[0].error or "")
    finally:
        runtime.close()


@pytest.fixture
def token_registry(gguf: bytes) -> Iterator[FileServer]:
    """A registry front that answers 401 with the distribution token challenge until given the token."""
    with serve_files() as server:
        content_digest = f"sha256:{hashlib.sha256(gguf).hexdigest()}"
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "sha256:" + "0" * 64,
                "size": 2,
            },
            "layers": [{"mediaType": OLLAMA_MODEL, "digest": content_digest, "size": len(gguf)}],
        }
        server.add_json("/v2/private/model/manifests/latest", manifest)
        server.add(f"/v2/private/model/blobs/{content_digest}", gguf)
        server.add_json("/token", {"token": "registry-token-123"})
        server.require_authorization = (
            "Bearer registry-token-123",
            f'Bearer realm="{server.url}/token",service="test",scope="repository:private/model:pull"',
            {"/token"},
        )
        yield server


def test_the_registry_token_flow_is_answered_with_the_configured_credentials(
    token_registry: FileServer, gguf: bytes, data_dir: Path, context: Context
) -> None:
    address = token_registry.url.removeprefix("http://")
    runtime = open_runtime(data_dir, address, oci_username="puller", oci_password="s3cret")
    try:
        resolved = runtime.provisioner.ensure_present(f"oci://{address}/private/model", context)
        assert resolved.path.read_bytes() == gguf
    finally:
        runtime.close()
    token_requests = [hit for hit in token_registry.hits if hit.path == "/token"]
    assert [hit.authorization for hit in token_requests] == ["Basic cHVsbGVyOnMzY3JldA=="]  # puller:s3cret
    blob_requests = [hit for hit in token_registry.hits if "/blobs/" in hit.path]
    assert {hit.authorization for hit in blob_requests} == {"Bearer registry-token-123"}


def test_a_refused_token_is_a_clear_error(
    token_registry: FileServer, data_dir: Path, context: Context
) -> None:
    token_registry.add_json("/token", {"errors": ["denied"]}, status=401)
    address = token_registry.url.removeprefix("http://")
    runtime = open_runtime(data_dir, address)
    try:
        with pytest.raises(SourceNotAllowed, match="token service"):
            runtime.provisioner.ensure_present(f"oci://{address}/private/model", context)
    finally:
        runtime.close()


@pytest.mark.parametrize("status", [401, 403])
def test_credentials_the_registry_refuses_are_not_reported_as_missing(
    token_registry: FileServer, data_dir: Path, context: Context, status: int
) -> None:
    token_registry.add_json("/token", {"errors": ["denied"]}, status=status)
    address = token_registry.url.removeprefix("http://")
    runtime = open_runtime(data_dir, address, oci_username="puller", oci_password="wrong")
    ref = f"oci://{address}/private/model"
    try:
        with pytest.raises(CredentialsRefused, match="refused the credentials sent") as raised:
            runtime.provisioner.ensure_present(ref, context)
        assert raised.value.code == "credentials_refused"
        assert "oci_username and oci_password" in raised.value.hint
        (download,) = runtime.provisioner.list_downloads()
        assert (download.ref, download.state, download.error_code) == (
            f"{ref}:latest",
            "failed",
            "credentials_refused",
        )
        (event,) = runtime.store.list_audit(action="models.pull")
        assert (event.outcome, event.detail["error"]) == ("error", "credentials_refused")
    finally:
        runtime.close()


def test_a_registry_that_refuses_the_token_it_issued_is_refusing_the_credentials(
    token_registry: FileServer, data_dir: Path, context: Context
) -> None:
    token_registry.add_json("/v2/private/model/manifests/latest", {"errors": ["denied"]}, status=403)
    token_registry.require_authorization = None
    address = token_registry.url.removeprefix("http://")
    runtime = open_runtime(data_dir, address, oci_username="puller", oci_password="s3cret")
    try:
        with pytest.raises(CredentialsRefused):
            runtime.provisioner.ensure_present(f"oci://{address}/private/model", context)
    finally:
        runtime.close()
    anonymous = open_runtime(data_dir, address)
    try:  # without credentials, a 403 asks for them
        with pytest.raises(SourceNotAllowed, match="refused access") as raised:
            anonymous.provisioner.ensure_present(f"oci://{address}/private/model", context)
        assert "set models.download.oci_username" in raised.value.hint
    finally:
        anonymous.close()


@pytest.mark.parametrize("credentials", [True, False])
def test_a_blob_the_registry_refuses_says_whether_credentials_were_sent(
    token_registry: FileServer, data_dir: Path, context: Context, credentials: bool
) -> None:
    blob_path = next(path for path in token_registry.files if "/blobs/" in path)
    token_registry.faults[blob_path].statuses = [403]
    address = token_registry.url.removeprefix("http://")
    login = {"oci_username": "puller", "oci_password": "s3cret"} if credentials else {}
    runtime = open_runtime(data_dir, address, **login)
    try:
        expected = CredentialsRefused if credentials else SourceNotAllowed
        with pytest.raises(expected, match="answered 403") as raised:
            runtime.provisioner.ensure_present(f"oci://{address}/private/model", context)
        if credentials:  # an anonymous token is not the user's credentials
            assert "check models.download.oci_username and oci_password" in raised.value.hint
        (download,) = runtime.provisioner.list_downloads()
        assert (download.state, download.error_code) == ("failed", expected.code)
    finally:
        runtime.close()


def test_a_token_that_expires_mid_download_is_renewed(
    token_registry: FileServer, gguf: bytes, data_dir: Path, context: Context
) -> None:
    blob_path = next(path for path in token_registry.files if "/blobs/" in path)
    token_registry.faults[blob_path].bytes_per_second = 1024 * 1024  # a part takes about a second
    address = token_registry.url.removeprefix("http://")
    runtime = open_runtime(data_dir, address, connections=1, part_bytes=1024 * 1024)

    def expire_after_the_first_part() -> None:
        deadline = time.monotonic() + 30
        while not token_registry.body_requests(blob_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        token_registry.add_json("/token", {"token": "registry-token-456"})
        assert token_registry.require_authorization is not None
        token_registry.require_authorization = (
            "Bearer registry-token-456",
            *token_registry.require_authorization[1:],
        )

    rotation = threading.Thread(target=expire_after_the_first_part)
    rotation.start()
    try:
        resolved = runtime.provisioner.ensure_present(f"oci://{address}/private/model", context)
    finally:
        rotation.join()
        runtime.close()
    assert resolved.path.read_bytes() == gguf
    assert len([hit for hit in token_registry.hits if hit.path == "/token"]) == 2
    used = {hit.authorization for hit in token_registry.body_requests(blob_path)}
    assert used == {"Bearer registry-token-123", "Bearer registry-token-456"}
