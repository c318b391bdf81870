"""``GET /api/v1/db`` and the Settings page's Database section: the running server's store, for
admins; in real headless Chromium for the page."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from playwright.sync_api import Browser, Page, expect

from appliance.store.migrations import MIGRATIONS
from tests.conftest import Server
from tests.web.browsing import browser, opened, page, shot
from tests.web.conftest import Keys
from tests.web.serving import serving

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


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in its user part (the test server trusts loopback: it asks none)."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_a_server_on_postgresql_shows_its_database_never_its_password(
    browser: Browser, data_dir: Path, postgres_url: str
) -> None:
    url = with_password(postgres_url, "s3cret-pw")
    with serving(data_dir, env={"APPLIANCE_STORE__URL": url}) as server:
        found = server.client.get("/api/v1/db").json()
        assert found["backend"] == "postgresql"
        assert found["schema_name"].startswith("test_")
        assert ":***@" in found["location"]
        with opened(browser, server.url) as seen:
            seen.goto("/#/settings")
            facts = seen.locator("#database-facts")
            expect(facts).to_contain_text("Backend: PostgreSQL")
            expect(facts).to_contain_text(f"Schema: {found['schema_name']}")
            expect(seen.locator("#database-hint")).to_contain_text("appliance db migrate")
            assert "s3cret-pw" not in seen.content()
            shot(seen, "settings-database-postgresql")
