"""Secrets are write-only: set to markers, used by pulls a loopback source refuses, and then found
nowhere: not in the data dir, the server's log, the CLI's output, nor any response the API lists."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fileserver import FileServer, serve_files
from tests.web.serving import serving

MARKERS = {
    "APPLIANCE_MODELS__DOWNLOAD__HF_TOKEN": "hf-marker-7c1d9e",
    "APPLIANCE_MODELS__DOWNLOAD__S3_SECRET_ACCESS_KEY": "s3-marker-4b8a2f",
    "APPLIANCE_MODELS__DOWNLOAD__OCI_PASSWORD": "oci-marker-91e5d3",
}


@pytest.fixture
def refusing() -> Iterator[FileServer]:
    """A hub, an S3 endpoint and a registry in one: every request (the token service too) is 401."""
    with serve_files() as server:
        server.require_authorization = ("never", f'Bearer realm="{server.url}/token",service="t"', set())
        yield server


def _listable_paths(schema: dict[str, Any]) -> list[str]:
    """Every GET path the API documents without a path parameter (event streams never end: left
    out), and the pages it does not document."""
    documented = {
        path
        for path, operations in schema["paths"].items()
        if "get" in operations and "{" not in path and not path.endswith("/events")
    }
    return sorted({*documented, "/", "/ui", "/metrics", "/schema/openapi.json"})


def test_secrets_never_appear_in_data_logs_output_responses_or_metrics(
    refusing: FileServer, data_dir: Path, cli: object
) -> None:
    address = refusing.url.removeprefix("http://")
    env = {
        **MARKERS,
        "APPLIANCE_MODELS__DOWNLOAD__HF_ENDPOINT": refusing.url,
        "APPLIANCE_MODELS__DOWNLOAD__S3_ENDPOINT": refusing.url,
        "APPLIANCE_MODELS__DOWNLOAD__S3_ACCESS_KEY_ID": "AKIDTEST",
        "APPLIANCE_MODELS__DOWNLOAD__OCI_USERNAME": "puller",
        "APPLIANCE_MODELS__DOWNLOAD__OCI_PLAIN_HTTP": json.dumps([address]),
        "APPLIANCE_MODELS__DOWNLOAD__RETRIES": "0",
    }
    refs = ["hf:org/private-model", "s3://bucket/private.gguf", f"oci://{address}/private/model"]
    seen: list[str] = []
    with serving(data_dir, env=env) as server:
        for ref in refs:
            pulled = server.client.post("/api/v1/models/pull", json={"ref": ref})
            assert pulled.status_code >= 400, pulled.text  # refused: the credentials do not open it
            seen.append(pulled.text)
            on_cli = cli("models", "pull", ref, env=env)  # type: ignore[operator]
            assert on_cli.returncode == 1
            seen += [on_cli.stdout, on_cli.stderr]
        system = server.client.get("/api/v1/system").json()
        assert {key: system["secrets"][key] for key in ("models.download.hf_token",)} == {
            "models.download.hf_token": "set"
        }
        assert system["secrets"]["models.download.s3_secret_access_key"] == "set"
        assert system["secrets"]["models.download.oci_password"] == "set"
        for path in _listable_paths(server.client.get("/schema/openapi.json").json()):
            seen.append(server.client.get(path).text)
        downloads = server.client.get("/api/v1/downloads").json()
        assert len(downloads) >= 1  # the pulls were made, and failed
        for download in downloads:
            seen.append(server.client.get(f"/api/v1/downloads/{download['id']}").text)
        seen.append(server.client.get("/api/v1/audit", params={"limit": 1000}).text)
        seen.append(server.client.get("/metrics").text)
        shown = cli("system", "--json", env=env)  # type: ignore[operator]
        assert json.loads(shown.stdout)["secrets"]["models.download.hf_token"] == "set"
        seen += [shown.stdout, shown.stderr]
    seen += server.output
    # The markers did reach the sources that asked (so they were really in use) ...
    hf_token = MARKERS["APPLIANCE_MODELS__DOWNLOAD__HF_TOKEN"]
    assert any(hit.authorization == f"Bearer {hf_token}" for hit in refusing.hits)
    stored = b"".join(path.read_bytes() for path in data_dir.rglob("*") if path.is_file())
    for marker in MARKERS.values():
        assert marker.encode() not in stored, marker
        for text in seen:
            assert marker not in text, (marker, text[:2000])
