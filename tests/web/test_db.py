"""``GET /api/v1/db`` and the Settings page's Database section: the running server's store, for
admins; in real headless Chromium for the page."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from appliance.store.migrations import MIGRATIONS
from tests.conftest import Server
from tests.web.browsing import browser, page, shot
from tests.web.conftest import Keys

__all__ = ["browser", "page"]  # fixtures this module uses from browsing


def test_the_api_gives_the_stores_status(server: Server) -> None:
    found = server.client.get("/api/v1/db").json()
    assert found["backend"] == "sqlite"
    assert found["location"].endswith("/appliance.db")
    assert found["schema_name"] is None
    assert found["schema_version"] == MIGRATIONS[-1].name
    assert (found["pending"], found["newer"]) == ([], [])
    assert found["applied"] == [migration.name for migration in MIGRATIONS]
    assert found["tables"]["models"] == 0
    assert found["tables"]["registry_generation"] == 1


def test_only_admins_see_the_database(keys: Keys, server: Server) -> None:
    assert (
        server.client.get("/api/v1/db", headers={"authorization": f"Bearer {keys.admin}"}).status_code == 200
    )
    refused = server.client.get("/api/v1/db", headers={"authorization": f"Bearer {keys.user}"})
    assert refused.status_code == 403


def test_the_settings_page_shows_the_database_and_how_to_move_it(page: Page, server: Server) -> None:
    page.goto("/#/settings")
    facts = page.locator("#database-facts")
    expect(facts).to_contain_text("Backend: SQLite")
    expect(facts).to_contain_text(f"Schema version: {MIGRATIONS[-1].name}")
    expect(facts).to_contain_text("Pending migrations: none")
    expect(page.locator("#database-tables")).to_contain_text("registry_generation")
    expect(page.locator("#database-hint")).to_contain_text("appliance db copy --to postgresql://")
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "settings-database")
