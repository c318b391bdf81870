"""The HTTP API of a real ``appliance serve`` process on a free loopback port."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import APPLIANCE, Server, import_file, started_server
from tests.fileserver import serve_files
from tests.web.serving import serving

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server, with no models, for the module's tests that change nothing (or put back what
    they change); those that add models, or read the audit log or what is loaded, have
    ``own_server``."""
    return shared_server


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    with started_server(data_dir) as started:
        yield started


def test_health_and_readiness(own_server: Server, data_dir: Path, tiny_gguf: Path) -> None:
    """REQ-MODELS-0114: not ready while no inference path exists, and say why."""
    server = own_server
    assert server.client.get("/healthz").json() == {"status": "ok"}
    not_ready = server.client.get("/readyz")
    assert not_ready.status_code == 503
    reasons = not_ready.json()["reasons"]
    assert any("import a GGUF model" in reason for reason in reasons)
    import_file(data_dir, tiny_gguf)
    ready = server.client.get("/readyz")
    assert ready.status_code == 200
    assert (ready.json()["ready"], ready.json()["reasons"]) == (True, [])


def test_models_lifecycle_over_http(own_server: Server, tiny_gguf: Path) -> None:
    client = own_server.client
    assert client.get("/api/v1/models").json() == []
    imported = client.post(
        "/api/v1/models/import",
        json={"path": str(tiny_gguf), "name": "library/tiny:1"},
        headers={"X-Request-ID": "req-42"},
    )
    assert imported.status_code == 200, imported.text
    digest = imported.json()["digest"]
    assert digest.startswith("sha256:")
    listed = client.get("/api/v1/models").json()
    assert [model["name"] for model in listed] == ["library/tiny:1"]
    shown = client.get("/api/v1/models/library/tiny:1").json()
    assert shown["artifacts"][0]["digest"] == digest
    assert shown["capabilities"]["architecture"] == "llama"
    assert client.patch("/api/v1/models/library/tiny:1", json={"pinned": True}).json()["pinned"] is True
    verified = client.post("/api/v1/models/verify", json={}).json()
    assert [(result["digest"], result["ok"]) for result in verified] == [(digest, True)]
    assert client.post("/api/v1/models/gc").json()["orphan_blobs"] == 0
    removed = client.delete("/api/v1/models/library/tiny:1")
    assert removed.json() == {"freed_bytes": tiny_gguf.stat().st_size}
    assert client.get("/api/v1/models").json() == []

    audit = client.get("/api/v1/audit", params={"action": "models.import"}).json()
    assert [(event["actor"], event["correlation_id"]) for event in audit] == [("api:127.0.0.1", "req-42")]
    assert len(client.get("/api/v1/audit", params={"limit": 2}).json()) == 2


def test_errors_are_problem_details(server: Server, tmp_path: Path) -> None:
    client = server.client
    missing = client.get("/api/v1/models/ghost")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith(PROBLEM)
    body = missing.json()
    assert body["code"] == "model_not_found"
    assert body["type"] == "urn:appliance:error:model_not_found"
    assert "ghost:latest" in body["detail"]
    assert body["hint"]

    bad_name = client.get("/api/v1/models/bad name")
    assert (bad_name.status_code, bad_name.json()["code"]) == (400, "invalid_model_name")

    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    wrong = client.post("/api/v1/models/import", json={"path": str(not_a_model)})
    assert (wrong.status_code, wrong.json()["code"]) == (400, "unsupported_format")
    gone = client.post("/api/v1/models/import", json={"path": str(tmp_path / "nope.gguf")})
    assert (gone.status_code, gone.json()["code"]) == (404, "source_not_found")

    invalid_body = client.post("/api/v1/models/import", json={"name": "x"})
    assert invalid_body.status_code == 400
    assert invalid_body.headers["content-type"].startswith(PROBLEM)

    assert client.get("/api/v1/models").json() == []  # none of that changed anything
    assert client.get("/healthz").status_code == 200  # and the server keeps serving


def test_openapi_and_docs_work_air_gapped(server: Server) -> None:
    spec = server.client.get("/schema/openapi.json").json()
    assert {"/healthz", "/readyz", "/api/v1/models", "/api/v1/models/{name}", "/api/v1/audit"} <= set(
        spec["paths"]
    )
    page = server.client.get("/schema").text
    referenced = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert referenced, page
    for url in referenced:
        assert url.startswith("/schema/assets/"), f"the docs page loads {url} from outside"
        assert server.client.get(url).status_code == 200


def test_serving_beyond_loopback_requires_api_keys_and_offers_the_setup_token(data_dir: Path) -> None:
    with serving(data_dir, "--host", "0.0.0.0", "--insecure-http") as server:
        assert "one-time setup token" in server.line_with("setup token")
        assert server.client.get("/api/v1/models").status_code == 401
        assert server.client.get("/api/v1/login").json() == {"auth": True, "setup": True}


def test_the_inference_log_filter_takes_a_model_name(server: Server) -> None:
    assert server.client.get("/api/v1/inference", params={"model": "tiny"}).json() == []
    refused = server.client.get("/api/v1/inference", params={"model": "Bad Name!"})
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith(PROBLEM)


def test_system_and_preferences_over_http(server: Server) -> None:
    system = server.client.get("/api/v1/system").json()
    assert system["cpu_count"] >= 1
    # a plain serve sizes the engine from the machine and says so
    assert system["engine"]["parallel"] >= 8
    assert system["engine"]["threads"] >= 1
    assert "physical cores" in system["engine"]["parallel_from"]
    assert system["memory"]["total_bytes"] > 0
    assert "cpu" in [device["kind"] for device in system["devices"]]
    assert "CPU" in system["llama_cpp_system_info"]
    assert system["cache"] == {"used_bytes": 0, "max_bytes": None}
    saved = server.client.put("/api/v1/preferences/models.cache.max_bytes", json={"value": "1GB"})
    assert saved.json()["value"] == 1_000_000_000
    assert server.client.get("/api/v1/system").json()["cache"]["max_bytes"] == 1_000_000_000
    refused = server.client.put("/api/v1/preferences/models.cache.evict_policy", json={"value": "random"})
    assert refused.status_code == 400
    assert refused.json()["code"] == "invalid_setting"
    assert server.client.put("/api/v1/preferences/nope", json={"value": 1}).status_code == 400
    reset = server.client.put("/api/v1/preferences/models.cache.max_bytes", json={"value": None})
    assert reset.json()["overridden"] is False


def test_cross_site_requests_and_foreign_host_names_are_refused(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    body = {"ref": "ftp://mirror.lan/x.gguf"}  # would be a 400 if it got through
    evil = server.client.post("/api/v1/models/pull", json=body, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    assert evil.json()["code"] == "forbidden"
    same = server.client.post(
        "/api/v1/models/pull", json=body, headers={"Origin": f"http://127.0.0.1:{port}"}
    )
    assert same.status_code == 400  # same origin: the request reaches the handler
    assert server.client.post("/api/v1/models/pull", json=body).status_code == 400  # no Origin: an API client
    rebound = server.client.get("/api/v1/models", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status_code == 400
    assert server.client.get("/api/v1/models", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_every_post_that_creates_nothing_answers_200(own_server: Server, tiny_gguf: Path) -> None:
    client = own_server.client
    assert (
        client.post("/api/v1/models/import", json={"path": str(tiny_gguf), "name": "tiny"}).status_code == 200
    )
    assert client.post("/api/v1/models/load", json={"name": "tiny"}).status_code == 200
    assert client.post("/api/v1/models/unload", json={"name": "tiny"}).status_code == 200
    assert client.post("/api/v1/models/verify", json={}).status_code == 200
    assert client.post("/api/v1/models/gc").status_code == 200


@pytest.mark.parametrize("keep_alive", ["bogus", "", "5 minutes"])
def test_load_refuses_a_keep_alive_that_is_not_a_duration(
    own_server: Server, tiny_gguf: Path, data_dir: Path, keep_alive: object
) -> None:
    server = own_server
    assert server.client.post("/api/v1/models/import", json={"path": str(tiny_gguf)}).is_success
    refused = server.client.post("/api/v1/models/load", json={"name": "tiny", "keep_alive": keep_alive})
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith(PROBLEM)
    assert "keep_alive" in refused.json()["detail"]
    assert "'5m'" in refused.json()["detail"]  # the accepted forms
    assert server.client.get("/api/v1/ps").json()["models"] == []  # nothing loaded
    if keep_alive == "bogus":  # the CLI shows the server's own message
        port = server.url.rsplit(":", 1)[1]
        cli = subprocess.run(
            [*APPLIANCE, "--data-dir", str(data_dir), "models", "load", "tiny", "--keep-alive", "bogus"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "APPLIANCE_PORT": port},
        )
        assert cli.returncode == 1
        assert "'bogus' is not a duration" in cli.stderr


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/api/v1/inference", "99999999999999999999"),
        ("/api/v1/inference", "-99999999999999999999"),
        ("/api/v1/inference", "-1"),
        ("/api/v1/inference", "0"),
        ("/api/v1/inference", "10001"),
        ("/api/v1/audit", "99999999999999999999"),
        ("/api/v1/audit", "-1"),
    ],
)
def test_a_limit_out_of_bounds_is_refused(server: Server, path: str, value: str) -> None:
    refused = server.client.get(path, params={"limit": value})
    assert refused.status_code == 400
    assert refused.json()["code"] == "invalid_input"
    assert "limit" in refused.json()["detail"]


def test_a_nul_byte_in_an_import_path_is_a_clear_400(server: Server, tmp_path: Path) -> None:
    refused = server.client.post("/api/v1/models/import", json={"path": f"{tmp_path}/a\u0000b.gguf"})
    assert refused.status_code == 400
    assert refused.json()["code"] == "source_unreadable"
    assert "NUL byte" in refused.json()["detail"]
    assert server.client.get("/api/v1/models").json() == []


@pytest.mark.parametrize(
    ("path", "params", "words"),
    [
        ("/api/v1/audit", {"since": "garbage"}, "ISO 8601"),
        ("/api/v1/audit", {"until": "2026-13-45"}, "ISO 8601"),
        ("/api/v1/downloads", {"state": "bogus"}, "pending, approved"),
        ("/api/v1/downloads", [("state", "done"), ("state", "3.4e38")], "pending, approved"),
    ],
)
def test_a_filter_that_cannot_match_is_refused_with_the_accepted_forms(
    server: Server, path: str, params: Any, words: str
) -> None:
    refused = server.client.get(path, params=params)
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith(PROBLEM)
    assert words in refused.json()["hint"]


def test_a_valid_filter_still_filters(own_server: Server, tiny_gguf: Path) -> None:
    server = own_server
    assert server.client.post("/api/v1/models/import", json={"path": str(tiny_gguf)}).is_success
    assert len(server.client.get("/api/v1/audit", params={"since": "2000-01-01"}).json()) == 1
    assert server.client.get("/api/v1/audit", params={"until": "2000-01-01T00:00:00Z"}).json() == []
    assert server.client.get("/api/v1/downloads", params={"state": "done"}).json() == []


def error_message(body: dict[str, Any], shape: str) -> str:
    if shape == "problem":
        return str(body["detail"])
    return str(body["error"]["message"] if shape == "openai" else body["error"])


def test_refusals_before_a_handler_are_well_formed_on_every_surface(server: Server) -> None:
    client = server.client
    no_body = client.post("/api/v1/models/import")
    assert no_body.status_code == 400
    assert no_body.headers["content-type"].startswith(PROBLEM)
    assert no_body.json()["detail"].startswith("missing request body")

    port = server.url.rsplit(":", 1)[1]
    for path, shape in (("/api/v1/models", "problem"), ("/v1/models", "openai"), ("/api/tags", "ollama")):
        rebound = client.get(path, headers={"Host": f"attacker.example:{port}"})
        assert rebound.status_code == 400, path
        assert "attacker.example" in error_message(rebound.json(), shape)
    assert client.get("/api/v1/models", headers={"Host": "x"}).headers["content-type"].startswith(PROBLEM)

    too_big = b"[" + b"0," * (9 * 1024 * 1024) + b"0]"  # past the 16 MiB default body limit
    large = client.post(
        "/api/v1/models/import", content=too_big, headers={"content-type": "application/json"}
    )
    assert (large.status_code, large.json()["code"]) == (413, "payload_too_large")
    large = client.post("/v1/chat/completions", content=too_big, headers={"content-type": "application/json"})
    assert (large.status_code, large.json()["error"]["code"]) == (413, "payload_too_large")
    not_allowed = client.put("/api/v1/models")
    assert (not_allowed.status_code, not_allowed.json()["code"]) == (405, "method_not_allowed")
    assert not_allowed.headers["allow"]


@contextmanager
def client_stream(server: Server, path: str) -> Iterator[httpx.Response]:
    with httpx.Client(base_url=server.url, timeout=30) as client, client.stream("GET", path) as response:
        yield response


def test_download_events_are_each_well_formed(own_server: Server, tiny_gguf: Path) -> None:
    """Every event is one block of `event:` and `data:` lines ended by a blank line, once each."""
    server = own_server
    with serve_files() as files, client_stream(server, "/api/v1/downloads/events") as response:
        served = files.add("/events.gguf", tiny_gguf.read_bytes())
        assert server.client.post("/api/v1/models/pull", json={"ref": served}).status_code in (200, 202)
        raw = b""
        for chunk in response.iter_raw():
            raw += chunk
            if b"\r\n\r\n" in raw or b"\n\n" in raw:
                break
    first = raw.replace(b"\r\n", b"\n").split(b"\n\n")[0].decode()
    fields = [line.split(":", 1)[0] for line in first.splitlines()]
    assert fields == ["event", "data"], first
    assert first.startswith("event: download\n")


def test_every_response_carries_the_security_headers(server: Server) -> None:
    for path in (
        "/",
        "/ui/app.js",
        "/schema",
        "/api/v1/models",
        "/api/v1/models/ghost",
        "/nowhere",
        "/v1/models",
    ):
        headers = server.client.get(path).headers
        assert headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"


def test_import_over_http_refuses_a_second_gguf_then_replaces_it_when_asked(
    own_server: Server, tiny_gguf: Path, make_gguf: Any
) -> None:
    client = own_server.client
    first = client.post("/api/v1/models/import", json={"path": str(tiny_gguf), "name": "swap"})
    assert first.status_code == 200, first.text
    other = make_gguf("other.gguf", seed=7)
    refused = client.post("/api/v1/models/import", json={"path": str(other), "name": "swap"})
    assert refused.status_code == 409
    assert refused.json()["code"] == "model_exists"
    assert "--replace" in refused.json()["hint"]
    assert client.get("/api/v1/models/swap").json()["artifacts"][0]["digest"] == first.json()["digest"]
    replaced = client.post(
        "/api/v1/models/import", json={"path": str(other), "name": "swap", "replace": True}
    )
    assert replaced.status_code == 200, replaced.text
    artifacts = client.get("/api/v1/models/swap").json()["artifacts"]
    assert [artifact["digest"] for artifact in artifacts] == [replaced.json()["digest"]]
    assert replaced.json()["digest"] != first.json()["digest"]


def test_import_over_http_hard_links_only_when_asked(own_server: Server, tiny_gguf: Path) -> None:
    linked = own_server.client.post(
        "/api/v1/models/import", json={"path": str(tiny_gguf), "name": "linked", "link": True}
    )
    assert linked.status_code == 200, linked.text
    assert linked.json()["method"] in ("hardlink", "reflink")
    assert linked.json()["method"] == "reflink" or os.stat(tiny_gguf).st_nlink == 2
