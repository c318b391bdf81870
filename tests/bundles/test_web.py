"""``/api/v1/bundle`` and the models page's bundle actions, against a real server (and Chromium)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from tests.conftest import Server
from tests.tiny_model import write_llama_gguf
from tests.web.browsing import shot


def _import_tiny(server: Server, tmp_path: Path) -> None:
    model = write_llama_gguf(tmp_path / "tiny.gguf", vocab_size=4096)
    imported = server.client.post("/api/v1/models/import", json={"path": str(model), "name": "tiny"})
    assert imported.status_code == 200, imported.text


def test_download_a_bundle_and_upload_it_back(server: Server, tmp_path: Path) -> None:
    _import_tiny(server, tmp_path)
    missing = server.client.get("/api/v1/bundle", params={"name": ["tiny", "ghost"]})
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.json()["code"] == "model_not_found"

    downloaded = server.client.get("/api/v1/bundle", params={"name": "tiny"})
    assert downloaded.status_code == 200
    assert downloaded.headers["content-disposition"] == 'attachment; filename="models.tar"'
    assert int(downloaded.headers["content-length"]) == len(downloaded.content)
    with tarfile.open(fileobj=io.BytesIO(downloaded.content)) as tar:
        assert tar.getnames()[-1] == "index.json"

    again = server.client.post(
        "/api/v1/bundle", content=downloaded.content, headers={"content-type": "application/x-tar"}
    )
    assert again.status_code == 200, again.text
    assert [(found["model"]["name"], found["added"]) for found in again.json()["models"]] == [
        ("tiny:latest", False)
    ]
    assert again.json()["blobs_skipped"] == 1

    assert server.client.delete("/api/v1/models/tiny").status_code == 200
    damaged = bytearray(downloaded.content)
    damaged[len(damaged) // 2] ^= 0x01  # inside the model's blob
    refused = server.client.post("/api/v1/bundle", content=bytes(damaged))
    assert refused.status_code == 422
    assert refused.json()["code"] == "bundle_damaged"
    assert "does not match its digest" in refused.json()["detail"]
    assert server.client.get("/api/v1/models").json() == []

    not_tar = server.client.post("/api/v1/bundle", content=b"just some bytes" * 100)
    assert not_tar.status_code == 400
    assert not_tar.json()["code"] == "not_a_bundle"

    uploaded = httpx.post(  # streamed in pieces, as a large upload arrives
        f"{server.url}/api/v1/bundle",
        content=(downloaded.content[i : i + 65536] for i in range(0, len(downloaded.content), 65536)),
        timeout=60,
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["models"][0]["added"] is True
    assert [model["name"] for model in server.client.get("/api/v1/models").json()] == ["tiny:latest"]


def test_the_models_page_exports_and_imports_a_bundle(page: Page, server: Server, tmp_path: Path) -> None:
    _import_tiny(server, tmp_path)
    page.goto("/#/models")
    row = page.locator("#models-table tr[data-model='tiny:latest']")
    row.get_by_label("select tiny:latest for a bundle").check()
    with page.expect_download() as started:
        page.get_by_role("button", name="Export bundle (selected, or all)").click()
    saved = tmp_path / "from-browser.tar"
    started.value.save_as(saved)
    with tarfile.open(saved) as tar:
        assert "index.json" in tar.getnames()

    assert server.client.delete("/api/v1/models/tiny").status_code == 200
    page.reload()
    expect(page.locator("#models")).to_contain_text("No models yet")
    page.get_by_label("Import a bundle (.tar)").set_input_files(str(saved))
    page.get_by_role("button", name="Import bundle").click()
    expect(page.locator("#bundle-status")).to_contain_text(
        "imported tiny:latest; 1 blobs received, 0 skipped"
    )
    expect(row).to_be_visible()
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "models-bundle-imported")

    saved.write_bytes(saved.read_bytes()[:4096])  # cut short: refused, and the page says why
    page.get_by_label("Import a bundle (.tar)").set_input_files(str(saved))
    page.get_by_role("button", name="Import bundle").click()
    expect(page.locator("#errors")).to_contain_text("the bundle is truncated")
