"""The browser UI in real headless Chromium (Debian's, driven by Playwright), against a real server
with auth off (loopback's default): no login, every page an admin's.

Screenshots of every page land in test-artifacts/ui/.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Response, expect

from appliance.names import ModelName
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import NewArtifact
from tests.conftest import Server, import_file
from tests.fileserver import Faults, serve_files
from tests.models.dirlayouts import write_ollama_dir
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf
from tests.web.browsing import browser, page, shot

__all__ = ["browser", "page"]  # fixtures this module uses from browsing


def test_the_api_docs_page_renders_under_the_csp(page: Page, server: Server) -> None:
    """Swagger UI starts from its own files and fetches the document; the page fixture checks that
    the CSP refused nothing. (The bundled Swagger UI predates OpenAPI 3.1, which Litestar writes,
    so it says it cannot render the definition: that needs a newer swagger-ui bundle.)"""
    with page.expect_response(lambda response: response.url.endswith("/schema/openapi.json")) as fetched:
        page.goto("/schema")
    assert fetched.value.ok
    expect(page.locator("#swagger-container .swagger-ui")).to_be_visible()
    shot(page, "api-docs")


def test_no_other_page_can_frame_the_ui(browser: Browser, server: Server) -> None:
    context = browser.new_context()
    other = context.new_page()  # about:blank stands for any other site
    with other.expect_console_message(lambda message: "frame-ancestors 'none'" in message.text):
        other.set_content(f'<iframe src="{server.url}/"></iframe>')
    assert other.frames[-1].locator("#readiness").count() == 0  # the UI never rendered inside it
    context.close()


@pytest.fixture
def tiny(data_dir: Path, tiny_gguf: Path) -> str:
    import_file(data_dir, tiny_gguf, "tiny")
    return "tiny:latest"


def test_every_page_renders(page: Page, tiny: str) -> None:
    page.goto("/")
    expect(page.locator("#readiness")).to_contain_text("Ready to serve")
    expect(page.locator("#dashboard")).to_contain_text("models.import")
    expect(page.locator("#engine-devices")).to_contain_text("runs on: CPU")
    expect(page.locator("#engine-choices")).to_contain_text("requests at once")
    expect(page.locator("#secrets")).to_contain_text("models.download.hf_token: unset")  # never a value
    expect(page.locator("#account")).to_be_hidden()  # auth off: nobody signs in, nobody logs out
    shot(page, "dashboard")
    for link, heading in [
        ("Models", "Models"),
        ("Chat", "Chat"),
        ("Audit log", "Audit log"),
        ("Settings", "Settings"),
    ]:
        page.get_by_role("link", name=link).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        expect(page.get_by_role("link", name=link)).to_have_attribute("aria-current", "page")
        shot(page, link.lower().replace(" ", "-"))
    expect(page.locator("#errors")).to_be_empty()


def test_a_cancelled_pull_can_be_resumed_from_the_page(page: Page, tmp_path: Path) -> None:
    content = write_llama_gguf(tmp_path / "served.gguf", padding_bytes=3 * 1024 * 1024).read_bytes()
    with serve_files() as files:
        faults = Faults(bytes_per_second=128 * 1024)
        url = files.add("/models/resumed.gguf", content, faults)
        page.goto("/#/models")
        page.get_by_label("Pull a reference").fill(url)
        page.get_by_role("button", name="Pull").click()
        running = page.locator("#downloads-table tr[data-state='running']")
        expect(running.locator("progress")).to_be_visible()
        running.get_by_role("button", name="Cancel").click()
        cancelled = page.locator("#downloads-table tr[data-state='cancelled']")
        expect(cancelled).to_be_visible()
        faults.bytes_per_second = None
        cancelled.get_by_role("button", name="Resume").click()
        expect(page.locator("#downloads-table tr[data-state='done']")).to_be_visible(timeout=60_000)
        expect(page.locator("#models-table tr[data-model='resumed:latest']")).to_be_visible()
        expect(page.locator("#errors")).to_be_empty()


def test_pull_shows_progress_that_survives_a_reload(page: Page, server: Server, tmp_path: Path) -> None:
    content = write_llama_gguf(tmp_path / "served.gguf", padding_bytes=3 * 1024 * 1024).read_bytes()
    with serve_files() as files:
        url = files.add("/models/Pulled-In-Browser.gguf", content, Faults(bytes_per_second=128 * 1024))
        page.goto("/#/models")
        page.get_by_label("Pull a reference").fill(url)
        page.get_by_role("button", name="Pull").click()
        running = page.locator("#downloads-table tr[data-state='running']")
        expect(running.locator("progress")).to_be_visible()
        expect(running).to_contain_text(re.compile(r"[1-9][0-9.]* [KM]B of 3\.6 MB, .*/s"))  # bytes arrive
        shot(page, "models-pulling")
        page.reload()
        expect(running.locator("progress")).to_be_visible()  # the download is the server's; the page shows it
        expect(page.locator("#downloads-table tr[data-state='done']")).to_be_visible(timeout=60_000)
        expect(page.locator("#models-table")).to_contain_text("pulled-in-browser:latest")
    assert server.client.get("/api/v1/models/pulled-in-browser").status_code == 200


def test_a_bad_ref_shows_the_servers_error(page: Page) -> None:
    page.goto("/#/models")
    page.get_by_label("Pull a reference").fill("ftp://mirror.lan/model.gguf")
    page.get_by_role("button", name="Pull").click()
    expect(page.locator("#errors")).to_contain_text("unknown scheme 'ftp'")
    shot(page, "models-error")


def test_chat_streams_a_reply_from_the_tiny_model(page: Page, tiny: str) -> None:
    page.goto("/#/chat")
    expect(page.get_by_label("Model")).to_have_value(tiny)
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Message").fill("Hello there")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("#chat-log .assistant")
    expect(answer).not_to_be_empty()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=60_000)
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    shot(page, "chat-answered")


def test_deleting_a_model_asks_first(page: Page, server: Server, tiny: str) -> None:
    page.goto("/#/models")
    row = page.locator(f"#models-table tr[data-model='{tiny}']")
    expect(row).to_be_visible()
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_role("button", name="Delete").click()
    expect(row).to_be_visible()  # dismissed: nothing happens
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Delete").click()
    expect(page.locator("#models")).to_contain_text("No models yet")
    assert server.client.get("/api/v1/models").json() == []


def saves(answer: Response, key: str) -> bool:
    """Whether ``answer`` is the server's to the page's save of preference ``key``."""
    return answer.request.method == "PUT" and answer.url.endswith(f"/api/v1/preferences/{key}")


def test_a_settings_change_is_validated_and_persisted(page: Page, server: Server) -> None:
    page.goto("/#/settings")
    approval = page.get_by_label(re.compile("models.download.require_user_approval"))
    approval.check()
    page.locator("form[data-key='models.download.require_user_approval']").get_by_role(
        "button", name="Save"
    ).click()
    expect(page.locator("form[data-key='models.download.require_user_approval']")).to_contain_text(
        "setting: false"
    )

    budget = page.locator("form[data-key='models.cache.max_bytes']")
    budget.get_by_role("textbox").fill("lots")
    budget.get_by_role("button", name="Save").click()
    expect(page.locator("#errors")).to_contain_text("invalid value for models.cache.max_bytes")
    budget.get_by_role("textbox").fill("500GB")
    with page.expect_response(lambda answer: saves(answer, "models.cache.max_bytes")) as saved_budget:
        budget.get_by_role("button", name="Save").click()
    assert saved_budget.value.status == 200
    expect(page.locator("#errors")).to_be_empty()

    # routing's preferences (REQ-MODELS-0122): which providers model calls may go to
    allowed = page.locator("form[data-key='model_routing.allowed_external_providers']")
    allowed.get_by_role("textbox").fill("openai\nlan")
    # The form reads "setting: []" before the save as after it: wait for the save's answer itself.
    with page.expect_response(
        lambda answer: saves(answer, "model_routing.allowed_external_providers")
    ) as saved:
        allowed.get_by_role("button", name="Save").click()
    assert saved.value.status == 200
    expect(allowed).to_contain_text("setting: []")

    page.reload()
    expect(page.get_by_label(re.compile("models.download.require_user_approval"))).to_be_checked()
    expect(page.locator("form[data-key='models.cache.max_bytes']").get_by_role("textbox")).to_have_value(
        "500000000000"
    )
    shot(page, "settings-saved")
    stored = {p["key"]: p["value"] for p in server.client.get("/api/v1/preferences").json()}
    assert stored["models.download.require_user_approval"] is True
    assert stored["models.cache.max_bytes"] == 500_000_000_000
    assert stored["model_routing.allowed_external_providers"] == ["openai", "lan"]


def test_a_pending_download_is_approved_from_the_page(page: Page, server: Server, tmp_path: Path) -> None:
    server.client.put("/api/v1/preferences/models.download.require_user_approval", json={"value": True})
    content = write_llama_gguf(tmp_path / "served.gguf").read_bytes()
    with serve_files() as files:
        url = files.add("/models/needs-approval.gguf", content)
        page.goto("/#/models")
        page.get_by_label("Pull a reference").fill(url)
        page.get_by_role("button", name="Pull").click()
        pending = page.locator("#downloads-table tr[data-state='pending']")
        expect(pending).to_be_visible()
        assert files.hits == []  # nothing fetched before an admin says yes
        shot(page, "models-pending")
        pending.get_by_role("button", name="Approve").click()
        expect(page.locator("#downloads-table tr[data-state='done']")).to_be_visible(timeout=60_000)
        expect(page.locator("#models-table")).to_contain_text("needs-approval:latest")


def test_pin_load_verify_and_unload_from_the_models_page(page: Page, server: Server, tiny: str) -> None:
    page.goto("/#/models")
    row = page.locator(f"#models-table tr[data-model='{tiny}']")
    row.get_by_role("button", name="Pin").click()
    expect(row.get_by_role("button", name="Unpin")).to_be_visible()
    expect(row).to_contain_text("ok, pinned")
    row.get_by_role("button", name="Load").click()
    expect(row).to_contain_text("ok, pinned, loaded")
    row.get_by_role("button", name="Verify").click()
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "models-loaded")
    assert [m["name"] for m in server.client.get("/api/v1/ps").json()["models"]] == [tiny]
    row.get_by_role("button", name="Unload").click()
    expect(row.get_by_role("button", name="Load")).to_be_visible()
    assert server.client.get(f"/api/v1/models/{tiny}").json()["pinned"] is True


def test_stop_ends_a_long_answer_and_frees_the_model(
    page: Page, server: Server, data_dir: Path, tmp_path: Path
) -> None:
    long = write_llama_gguf(tmp_path / "long.gguf", context=4096, chat_template=TINY_CHAT_TEMPLATE)
    import_file(data_dir, long, "long")
    page.goto("/#/chat")
    page.get_by_label("Temperature").fill("0")  # greedy decoding of this model never ends on its own
    page.get_by_label("Max tokens").fill("4000")
    page.get_by_label("Message").fill("Go on forever")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-log .assistant")).not_to_be_empty()
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#chat-log .assistant")).to_contain_text("[stopped]")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server stops generating for a client that went away
        if all(m["active_requests"] == 0 for m in server.client.get("/api/v1/ps").json()["models"]):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stopped request still holds its sequence")


def test_an_action_that_fails_keeps_its_message_on_screen(page: Page, data_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    import_file(data_dir, weights, "weights")
    page.goto("/#/models")
    page.locator("#models-table tr[data-model='weights:latest']").get_by_role("button", name="Load").click()
    expect(page.locator("#errors")).to_contain_text("GGUF")
    page.wait_for_timeout(1000)  # the table has been redrawn since; the message stays
    expect(page.locator("#errors")).to_contain_text("GGUF")


def test_a_folder_is_imported_from_the_models_page(page: Page, server: Server, tmp_path: Path) -> None:
    gguf = write_llama_gguf(tmp_path / "folder.gguf", seed=4).read_bytes()
    ollama = write_ollama_dir(tmp_path / "ollama", {("registry.ollama.ai", "library", "folder", "1b"): gguf})
    page.goto("/#/models")
    page.get_by_label("Import from a folder").fill(str(tmp_path))  # neither layout: the server says so
    page.get_by_role("button", name="Import folder").click()
    expect(page.locator("#errors")).to_contain_text("neither an Ollama models directory")
    page.get_by_label("Import from a folder").fill(str(ollama))
    page.get_by_role("button", name="Import folder").click()
    result = page.locator("#import-dir-result")
    expect(result).to_contain_text("imported: folder:1b")
    expect(result).to_contain_text("not imported: template layer")
    expect(page.locator("#models-table tr[data-model='folder:1b']")).to_be_visible()
    shot(page, "models-import-dir")
    assert server.client.get("/api/v1/models/folder:1b").status_code == 200


def test_a_large_registry_is_drawn_a_page_at_a_time(page: Page, server: Server, data_dir: Path) -> None:
    runtime = Runtime.open(
        Settings(data_dir=data_dir)
    )  # registered beside the server, as another process would
    try:
        for index in range(250):
            artifact = NewArtifact(
                filename="model.gguf",
                format="gguf",
                digest=f"sha256:{index:064x}",
                size_bytes=1000 + index,
                source_uri=None,
            )
            runtime.store.add_artifact(
                ModelName(f"many/model-{index:03d}", "q4"), artifact, capabilities={}, actor="test"
            )
    finally:
        runtime.close()
    page.goto("/#/models")
    rows = page.locator("#models-table tbody tr")
    expect(rows).to_have_count(200)
    expect(rows.first).to_have_attribute("data-model", "many/model-000:q4")
    page.locator("#models-more").click()
    expect(rows).to_have_count(250)
    expect(rows.last).to_have_attribute("data-model", "many/model-249:q4")
    expect(page.locator("#models-more")).to_have_count(0)  # nothing more to show
