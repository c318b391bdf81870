"""The HTTP API of a real ``appliance serve`` process on a free loopback port."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import Server

PROBLEM = "application/problem+json"


def test_health_and_readiness(server: Server, cli: object, tiny_gguf: Path) -> None:
    """REQ-MODELS-0114: not ready while no inference path exists, and say why."""
    assert server.client.get("/healthz").json() == {"status": "ok"}
    not_ready = server.client.get("/readyz")
    assert not_ready.status_code == 503
    reasons = not_ready.json()["reasons"]
    assert any("import a GGUF model" in reason for reason in reasons)
    assert cli("models", "import", str(tiny_gguf)).returncode == 0  # type: ignore[operator]
    ready = server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "reasons": []}


def test_models_lifecycle_over_http(server: Server, tiny_gguf: Path) -> None:
    client = server.client
    assert client.get("/api/v1/models").json() == []
    imported = client.post(
        "/api/v1/models/import",
        json={"path": str(tiny_gguf), "name": "library/tiny:1"},
        headers={"X-Request-ID": "req-42"},
    )
    assert imported.status_code == 201, imported.text
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


def test_serve_refuses_to_bind_beyond_loopback(cli: object) -> None:
    result = cli("serve", "--host", "0.0.0.0", "--port", "0")  # type: ignore[operator]
    assert result.returncode == 1
    assert "only loopback addresses" in result.stderr


def test_the_inference_log_filter_takes_a_model_name(server: Server) -> None:
    assert server.client.get("/api/v1/inference", params={"model": "tiny"}).json() == []
    refused = server.client.get("/api/v1/inference", params={"model": "Bad Name!"})
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith(PROBLEM)


def test_system_and_preferences_over_http(server: Server) -> None:
    system = server.client.get("/api/v1/system").json()
    assert system["cpu_count"] >= 1
    assert system["memory"]["total_bytes"] > 0
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


def test_gpus_without_memory_figures_do_not_break_the_system_page() -> None:
    from appliance.web.system import _vram

    assert _vram(" 81559, 1024") == {"vram_total_bytes": 81559 << 20, "vram_used_bytes": 1024 << 20}
    assert _vram(" [N/A], [N/A]") == {"vram_total_bytes": None, "vram_used_bytes": None}
