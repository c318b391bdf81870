"""The MCP page in real headless Chromium against a real server: the tools the caller may call with
their schemas on demand, and the client config to copy (a Bearer header only with auth on)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server
from tests.web.browsing import browser, opened, page, shot, sign_in
from tests.web.conftest import PASSWORD, Keys

__all__ = ["browser", "page"]  # fixtures this module uses from browsing


def test_the_page_lists_the_tools_and_the_config_without_a_key_when_auth_is_off(
    page: Page, server: Server
) -> None:
    page.goto("/#/mcp")
    expect(page.locator("nav a[aria-current='page']")).to_have_text("MCP")
    config = page.locator("#mcp-config")
    expect(config).to_contain_text(f"{server.url}/mcp")
    assert json.loads(config.inner_text()) == {"mcpServers": {"appliance": {"url": f"{server.url}/mcp"}}}
    expect(page.locator("#page")).to_contain_text("Auth is off")

    rows = page.locator("#mcp-tools-table tbody tr")
    listed = [tool["name"] for tool in server.client.get("/api/v1/mcp/tools").json()]
    expect(rows).to_have_count(len(listed))  # drawn once the page's own request is answered
    names = [row.get_attribute("data-tool") for row in rows.all()]
    assert names == listed
    assert {"chat", "tasks.create", "preference.get"} <= set(names)
    assert not any(name and name.startswith("artifacts.") for name in names)  # a job's own tools
    chat = page.locator("tr[data-tool='chat']")
    expect(chat).to_contain_text("infer")
    schema = chat.locator(".mcp-input-schema")
    expect(schema).to_be_hidden()
    chat.get_by_text("Schemas").click()
    expect(schema).to_be_visible()
    assert "messages" in json.loads(schema.inner_text())["properties"]
    assert "served_by" in json.loads(chat.locator(".mcp-output-schema").inner_text())["properties"]

    page.get_by_role("button", name="Copy the config").click()
    expect(page.locator("#mcp-config-copied")).to_have_text(re.compile("copied|selected"))
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "mcp")


@pytest.fixture
def auth_page(browser: Browser, keys: Keys, server: Server) -> Iterator[Page]:
    """A fresh tab on a server with auth on, an admin ``root`` and a user ``alice``."""
    with opened(browser, server.url) as fresh:
        yield fresh


def test_with_auth_on_the_config_asks_for_a_key_and_a_user_sees_only_her_tools(
    auth_page: Page, server: Server
) -> None:
    auth_page.goto("/#/mcp")
    sign_in(auth_page, "alice", PASSWORD)
    expect(auth_page.get_by_role("heading", level=1)).to_have_text("MCP")
    config = json.loads(auth_page.locator("#mcp-config").inner_text())
    assert config["mcpServers"]["appliance"]["headers"] == {"Authorization": "Bearer YOUR_API_KEY"}
    expect(auth_page.locator("#page a[href='#/keys']")).to_have_text("Keys page")
    expect(auth_page.locator("tr[data-tool='chat']")).to_be_visible()
    # A user may not read the appliance's preferences: those tools are not hers to call.
    expect(auth_page.locator("tr[data-tool='preference.get']")).to_have_count(0)
    expect(auth_page.locator("#errors")).to_be_empty()
