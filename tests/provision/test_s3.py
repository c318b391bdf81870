"""``s3://`` refs against a real S3-compatible server (moto in server mode) on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import httpx
import pytest

from appliance.audit import Context
from appliance.errors import RemoteNotFound, SourceNotAllowed
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.conftest import free_port
from tests.tiny_model import write_llama_gguf

KEY_ID = "AKIDTESTTESTTEST"
SECRET = "s3-secret-for-tests"


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(endpoint)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start: {process.communicate()[1]!r}") from None
            time.sleep(0.1)
    yield endpoint
    process.terminate()
    process.communicate(timeout=10)


def s3_client(endpoint: str) -> Any:
    return botocore.session.Session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


def open_runtime(data_dir: Path, endpoint: str, *, keyed: bool = True) -> Runtime:
    download: dict[str, object] = {"s3_endpoint": endpoint, "part_bytes": 1024 * 1024, "connections": 4}
    if keyed:
        download.update(s3_access_key_id=KEY_ID, s3_secret_access_key=SECRET)
    return Runtime.open(Settings(data_dir=data_dir, models={"download": download}))


@pytest.fixture
def gguf(tmp_path: Path) -> bytes:
    return write_llama_gguf(tmp_path / "m.gguf", padding_bytes=3 * 1024 * 1024).read_bytes()


def test_an_object_with_a_sha256_checksum_is_pulled_and_verified(
    s3_endpoint: str, gguf: bytes, data_dir: Path, context: Context
) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="models")
    client.put_object(Bucket="models", Key="llama/Tiny-S3.gguf", Body=gguf, ChecksumAlgorithm="SHA256")
    client.put_object(Bucket="models", Key="llama/plain.gguf", Body=gguf)
    runtime = open_runtime(data_dir, s3_endpoint)
    try:
        resolved = runtime.provisioner.ensure_present("s3://models/llama/Tiny-S3.gguf", context)
        assert (resolved.id, resolved.verification) == ("tiny-s3:latest", "source")
        assert resolved.path.read_bytes() == gguf
        plain = runtime.provisioner.ensure_present("s3://models/llama/plain.gguf", context)
        assert plain.verification == "unverified"  # no checksum stored with the object
        assert runtime.models.get("tiny-s3").artifacts[0].source_uri == "s3://models/llama/Tiny-S3.gguf"
    finally:
        runtime.close()
        client.close()


def test_missing_objects_and_refused_access_are_clear_errors(
    s3_endpoint: str, gguf: bytes, data_dir: Path, context: Context
) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="private")
    client.put_object(Bucket="private", Key="m.gguf", Body=gguf, ACL="private")
    client.close()
    runtime = open_runtime(data_dir, s3_endpoint)
    try:
        with pytest.raises(RemoteNotFound, match=r"has no object nothing\.gguf in bucket private"):
            runtime.provisioner.ensure_present("s3://private/nothing.gguf", context)
    finally:
        runtime.close()
    anonymous = open_runtime(data_dir, s3_endpoint, keyed=False)
    try:
        with pytest.raises(SourceNotAllowed, match="refused access"):
            anonymous.provisioner.ensure_present("s3://private/m.gguf", context)
        assert anonymous.models.list_models() == []
        # a pull that fails on the object's HEAD is a failed download like any other, with its error
        failed = [(d.ref, d.state, d.error_code) for d in anonymous.provisioner.list_downloads()]
        assert failed == [
            ("s3://private/m.gguf", "failed", "source_not_allowed"),
            ("s3://private/nothing.gguf", "failed", "remote_not_found"),
        ]
    finally:
        anonymous.close()
