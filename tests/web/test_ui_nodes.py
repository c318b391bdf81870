"""The Nodes page in real headless Chromium against a real server with auth on, an admin signed in,
and httpx playing the worker (join and heartbeats with a capability report, over real HTTP): a
join token made in the page, the node with its state and GPUs, drain, a model loaded onto the
node as the server records it, remove, and the server's errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from appliance.store.base import Server as StoredServer
from appliance.store.sqlite import SqliteStore
from tests.conftest import Server, import_file
from tests.web.browsing import browser, opened, shot, sign_in
from tests.web.conftest import PASSWORD, Keys

__all__ = ["browser"]  # a fixture this module uses from browsing

REDRAWN = 15_000  # ms: what a worker reports reaches the page on its next timed redraw (every 3 s)
CAPABILITIES = {
    "cpu": {"count": 16, "load_average": [0.5, 0.4, 0.3]},
    "memory": {"total_bytes": 64_000_000_000, "available_bytes": 48_000_000_000},
    "gpus": [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "vram_total_bytes": 80_000_000_000,
            "vram_used_bytes": 1_000_000_000,
        }
    ],
    "disk_free_bytes": 500_000_000_000,
    "engine": {"build": {"llama_cpp_version": "0.3.16"}, "gpu_offload": True},
    "memory_budget": 70_000_000_000,
    "version": "0.1.0",
}


@pytest.fixture(autouse=True)
def _patient_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's worker heartbeats only when the test says: it stays ready meanwhile."""
    monkeypatch.setenv("APPLIANCE_CLUSTER__HEARTBEAT_TIMEOUT", "600")


@pytest.fixture
def page(browser: Browser, keys: Keys, server: Server) -> Iterator[Page]:
    """A fresh tab on a server with auth on, signed in as the admin ``root`` on the Nodes page."""
    with opened(browser, server.url) as fresh:
        yield fresh


@pytest.fixture
def admin(keys: Keys, server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {keys.admin}"}, timeout=30
    ) as client:
        yield client


@dataclass
class Worker:
    """A joined worker: its credential goes with every call of ``client``."""

    client: httpx.Client

    def heartbeat(
        self,
        *,
        models: list[dict[str, Any]] | None = None,
        config_applied: str | None = None,
        capabilities: dict[str, Any] | None = None,
        **load: Any,
    ) -> dict[str, Any]:
        report = {
            "capabilities": capabilities,
            "load": load,
            "models": models or [],
            "config_applied": config_applied,
        }
        answer = self.client.post("/api/v1/cluster/heartbeat", json=report)
        assert answer.status_code == 200, answer.text
        reply: dict[str, Any] = answer.json()
        return reply


@dataclass
class Workers:
    url: str
    clients: list[httpx.Client] = field(default_factory=list)

    def join(self, token: str, name: str, capabilities: dict[str, Any] = CAPABILITIES) -> Worker:
        answer = httpx.post(
            f"{self.url}/api/v1/cluster/join",
            json={"token": token, "name": name, "capabilities": capabilities},
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        credential = answer.json()["credential"]
        client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {credential}"}, timeout=30
        )
        self.clients.append(client)
        return Worker(client)


@pytest.fixture
def workers(server: Server) -> Iterator[Workers]:
    made = Workers(server.url)
    yield made
    for client in made.clients:
        client.close()


def new_token(admin: httpx.Client) -> str:
    answer = admin.post("/api/v1/nodes/tokens", json={"expires": "1h"})
    assert answer.status_code == 201, answer.text
    token: str = answer.json()["token"]
    return token


def open_nodes(page: Page) -> None:
    page.goto("/#/nodes")
    sign_in(page, "root", PASSWORD)
    expect(page.get_by_role("heading", level=1)).to_have_text("Nodes")


def node_row(page: Page, name: str) -> Locator:
    return page.locator(f"#nodes-table tr[data-node='{name}']")


def test_a_token_made_in_the_page_joins_a_worker_that_shows_with_its_state_and_gpus(
    page: Page, server: Server, workers: Workers
) -> None:
    open_nodes(page)
    expect(page.locator("#nodes")).to_contain_text("No node has joined yet")
    page.select_option("#token-expires", "1h")
    page.get_by_role("button", name="Create join token").click()  # a POST: the session's CSRF token goes
    secret = page.locator("#new-token-secret")
    expect(secret).to_have_text(re.compile(r"^apjoin1\.-\.\S+$"))  # plain HTTP: no fingerprint
    token = secret.inner_text()
    expect(page.locator("#new-token-command")).to_have_text(
        f"appliance worker join {server.url} --token {token}"
    )
    token_id = token.split(".")[2]
    listed = page.locator(f"#tokens-table tr[data-token='{token_id}']")
    expect(listed).to_have_attribute("data-state", "active")
    expect(page.locator("#tokens")).not_to_contain_text(token)  # the list never shows a secret
    expect(page.locator("#errors")).to_be_empty()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy the line").click()
    expect(page.locator("#new-token")).to_contain_text("copied")
    assert page.evaluate("navigator.clipboard.readText()") == page.locator("#new-token-command").inner_text()

    worker = workers.join(token, "w1")
    worker.heartbeat(active=1, queued=2, loaded=[])
    node = node_row(page, "w1")
    expect(node).to_have_attribute("data-state", "ready", timeout=REDRAWN)
    expect(node.locator(".node-state")).to_have_text("ready")
    expect(node.locator(".node-heartbeat")).to_have_text(re.compile(r"^\d+ s ago$"))
    expect(node.locator(".node-machine")).to_contain_text("16 CPUs, RAM 48.0 GB free of 64.0 GB")
    expect(node.locator(".node-gpu")).to_have_text(["NVIDIA H100 80GB HBM3: 1.0 GB of 80.0 GB VRAM"])
    expect(node.locator(".node-machine")).to_contain_text("engine budget 70.0 GB")
    expect(node.locator(".node-load")).to_have_text("1 running, 2 queued")
    expect(node.locator(".node-models")).to_contain_text("none")
    expect(listed.locator("td").nth(5)).to_have_text("1", timeout=REDRAWN)  # the token's uses
    shot(page, "nodes")

    page.once("dialog", lambda dialog: dialog.accept())
    listed.get_by_role("button", name="Revoke").click()
    expect(listed).to_have_attribute("data-state", "revoked")
    expect(listed.get_by_role("button")).to_have_count(0)
    refused = httpx.post(f"{server.url}/api/v1/cluster/join", json={"token": token, "name": "w2"}, timeout=30)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]


def test_drain_and_a_model_loaded_onto_the_node_show_as_the_server_records_them(
    page: Page, admin: httpx.Client, workers: Workers, data_dir: Path, tiny_gguf: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    worker = workers.join(new_token(admin), "w1")
    worker.heartbeat()
    open_nodes(page)
    node = node_row(page, "w1")
    expect(node).to_have_attribute("data-state", "ready")

    node.get_by_role("button", name="Drain").click()
    expect(node).to_have_attribute("data-state", "draining")
    assert admin.get("/api/v1/nodes/w1").json()["state"] == "draining"
    assert worker.heartbeat()["drained"] is True
    node.get_by_role("button", name="Undrain").click()
    expect(node).to_have_attribute("data-state", "ready")
    assert admin.get("/api/v1/nodes/w1").json()["state"] == "ready"

    expect(node.locator(".node-pick")).to_have_value("tiny:latest")
    node.get_by_role("button", name="Load").click()
    model = node.locator(".node-model[data-model='tiny:latest']")
    expect(model).to_have_attribute("data-state", "assigned")
    expect(model).to_contain_text("told to load, not reported yet")
    expect(node.locator(".node-config")).to_have_text("config not applied yet")
    told = admin.get("/api/v1/nodes/w1").json()["config"]["models"]
    assert [entry["model"] for entry in told] == ["tiny:latest"]
    digest = told[0]["digest"]

    def held(state: str, reason: str | None = None) -> list[dict[str, Any]]:
        return [{"digest": digest, "model": "tiny:latest", "state": state, "reason": reason}]

    reply = worker.heartbeat(models=held("loading"))
    assert reply["config"]["models"][0]["digest"] == digest
    expect(model).to_have_attribute("data-state", "loading", timeout=REDRAWN)
    worker.heartbeat(models=held("failed", "not enough memory: it needs 3 GB, 2 GB are free"))
    expect(model).to_have_text(
        re.compile(r"tiny:latest failed: not enough memory: it needs 3 GB, 2 GB are free"), timeout=REDRAWN
    )
    expect(model.locator(".bad")).to_have_text("failed")
    worker.heartbeat(models=held("available"), config_applied=reply["config_version"], loaded=[digest])
    expect(model).to_have_attribute("data-state", "available", timeout=REDRAWN)
    expect(node.locator(".node-config")).to_have_count(0)
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "nodes-model")

    model.get_by_role("button", name="Unload").click()
    expect(model.get_by_role("button", name="Unload")).to_have_count(0)  # held still, no longer told to
    assert admin.get("/api/v1/nodes/w1").json()["config"]["models"] == []
    expect(node.locator(".node-config")).to_have_text("config not applied yet")
    newer = worker.heartbeat(models=held("available"), config_applied=reply["config_version"])
    assert newer["config"] == {"models": []}
    worker.heartbeat(models=held("cached"), config_applied=newer["config_version"])  # unloaded, kept
    expect(model).to_have_attribute("data-state", "cached", timeout=REDRAWN)
    expect(node.locator(".node-config")).to_have_count(0)


def test_remove_asks_first_and_the_servers_errors_show_with_their_hints(
    page: Page, admin: httpx.Client, workers: Workers, data_dir: Path, tiny_gguf: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    worker = workers.join(new_token(admin), "w1")
    worker.heartbeat()
    open_nodes(page)
    node = node_row(page, "w1")
    expect(node).to_have_attribute("data-state", "ready")

    asked: list[str] = []

    def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    node.get_by_role("button", name="Remove").click()
    expect(node).to_be_visible()
    assert [message.split("?")[0] for message in asked] == ["Remove node w1"]
    assert [n["name"] for n in admin.get("/api/v1/nodes").json()] == ["w1"]
    page.once("dialog", lambda dialog: dialog.accept())
    node.get_by_role("button", name="Remove").click()
    expect(page.locator("#nodes")).to_contain_text("No node has joined yet")
    assert admin.get("/api/v1/nodes").json() == []
    gone = worker.client.post("/api/v1/cluster/heartbeat", json={})
    assert gone.status_code == 401  # its credential went with it

    second = workers.join(new_token(admin), "w2", capabilities={})
    node = node_row(page, "w2")
    expect(node).to_have_attribute("data-state", "unavailable", timeout=REDRAWN)  # no heartbeat yet
    expect(node.locator(".node-heartbeat")).to_have_text("never")
    expect(node.locator(".node-machine")).to_have_text("not reported yet")
    second.heartbeat(capabilities=CAPABILITIES)  # as a worker reports a change
    expect(node).to_have_attribute("data-state", "ready", timeout=REDRAWN)
    expect(node.locator(".node-machine")).to_contain_text("16 CPUs")
    # The page's list of models was read when it opened: the model goes behind its back.
    assert admin.delete("/api/v1/models/tiny").status_code == 200
    node.get_by_role("button", name="Load").click()
    expect(page.locator("#errors")).to_contain_text("tiny")
    expect(page.locator("#errors")).to_contain_text("(list the models with `appliance models ls`)")
    assert admin.get("/api/v1/nodes/w2").json()["config"]["models"] == []
    shot(page, "nodes-error")


def test_a_server_that_went_away_is_said_on_the_next_redraw(page: Page, server: Server) -> None:
    open_nodes(page)
    expect(page.locator("#nodes")).to_contain_text("No node has joined yet")
    server.process.terminate()
    server.process.wait(timeout=30)
    expect(page.locator("#errors")).to_contain_text("Failed to fetch", timeout=REDRAWN)


def test_a_user_has_no_nodes_link_and_the_page_is_for_admins(page: Page, keys: Keys, server: Server) -> None:
    page.goto("/#/nodes")
    sign_in(page, "alice", PASSWORD)
    expect(page.get_by_role("heading", level=1)).to_have_text("Admins only")
    expect(page.get_by_role("navigation").get_by_role("link", name="Nodes")).to_be_hidden()
    user = {"Authorization": f"Bearer {keys.user}"}
    assert server.client.get("/api/v1/nodes", headers=user).status_code == 403
    assert server.client.post("/api/v1/nodes/tokens", json={}, headers=user).status_code == 403


def test_the_servers_sharing_the_database_show_alive_or_gone(
    page: Page, server: Server, data_dir: Path
) -> None:
    # Another server that shared this database once, and stopped long ago.
    store = SqliteStore(data_dir / "appliance.db")
    try:
        store.register_server(
            StoredServer(
                "oldpeer",
                "https://old.lan:8443",
                "9" * 64,
                "0.0.9",
                "2020-01-01T00:00:00.000000Z",
                "2020-01-01T00:00:00.000000Z",
            )
        )
    finally:
        store.close()
    this = (data_dir / "server-id").read_text().strip()
    open_nodes(page)
    row = page.locator(f"#servers-table tr[data-server='{this}']")
    expect(row).to_have_attribute("data-state", "alive")
    expect(row).to_contain_text(server.url)
    expect(row).to_contain_text("(this one)")
    gone = page.locator("#servers-table tr[data-server='oldpeer']")
    expect(gone).to_have_attribute("data-state", "gone")
    expect(gone).to_contain_text("https://old.lan:8443")
    expect(page.locator("#errors")).to_be_empty()
