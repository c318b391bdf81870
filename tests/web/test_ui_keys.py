"""The Keys and Users pages in real headless Chromium, against a real server with auth on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server
from tests.web.conftest import Keys
from tests.web.test_ui import browser, csp_violations, shot

__all__ = ["browser"]  # fixtures this module uses from the others


@pytest.fixture
def page(browser: Browser, keys: Keys, server: Server) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1366, "height": 800})
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    violations = csp_violations(opened)
    yield opened
    context.close()
    assert violations == []


def test_a_key_is_entered_made_shown_once_and_revoked_from_the_page(page: Page, keys: Keys) -> None:
    page.goto("/#/keys")
    expect(page.locator("#errors")).to_contain_text("enter an API key on the Keys page")
    page.fill("#api-key", keys.user)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#whoami")).to_have_text("This tab acts as user:alice (user).")
    expect(page.locator("#errors")).to_be_empty()
    page.fill("#key-name", "laptop")
    page.select_option("#key-expires", "30d")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-secret")
    expect(secret).to_contain_text("apl_")
    made = secret.inner_text()
    row = page.locator("#keys tr", has_text="laptop")
    expect(row).to_contain_text(made[:10] + "…")
    expect(row).to_contain_text("active")
    expect(page.locator("#keys")).not_to_contain_text(made)  # the list never shows a secret
    expect(page.locator("#keys tbody tr", has_text="root")).to_have_count(0)  # alice sees only her own
    shot(page, "keys")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    page.reload()  # the key stays for this tab; the new secret is gone for good
    expect(page.locator("#whoami")).to_contain_text("user:alice")
    expect(page.locator("#new-key-secret")).to_have_count(0)
    page.goto("/#/users")  # not an admin's key
    expect(page.locator("#errors")).to_contain_text("needs the admin role")


def test_an_admin_adds_and_removes_users_from_the_page(page: Page, keys: Keys) -> None:
    page.goto("/#/keys")
    page.fill("#api-key", keys.admin)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#whoami")).to_contain_text("user:root (admin)")
    page.get_by_role("link", name="Users").click()
    page.fill("#user-name", "bob")
    page.select_option("#user-role", "node")
    page.get_by_role("button", name="Add user").click()
    expect(page.locator("#users tr", has_text="bob")).to_contain_text("node")
    page.get_by_role("button", name="Add user").click()  # the name was cleared: the form says so
    page.fill("#user-name", "bob")
    page.get_by_role("button", name="Add user").click()
    expect(page.locator("#errors")).to_contain_text("user 'bob' already exists")
    shot(page, "users")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#users tr", has_text="bob").get_by_role("button", name="Remove").click()
    expect(page.locator("#users")).not_to_contain_text("bob")
