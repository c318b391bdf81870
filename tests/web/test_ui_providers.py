"""The Providers page in real headless Chromium against a real server and a fake OpenAI-compatible
provider on loopback: a provider added with a key through the form and tested, its key changed
(the test then refused) and cleared, the server's errors, removal; the key is never in the page
(its HTML, its fields, its storage) once sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server
from tests.egress.fakes import FakeOpenAI, serve_fake_openai
from tests.web.browsing import browser, page, shot

__all__ = ["browser", "page"]  # fixtures this module uses from browsing

PROVIDER_KEY = "sk-test-ui-key-0123456789"
NEW_KEY = "sk-test-ui-key-replaced-42"


def page_state(page: Page) -> str:
    """Everything the page holds that a script could read: its HTML, every field's value, storage."""
    state: str = page.evaluate(
        """() => [document.documentElement.outerHTML,
                  ...[...document.querySelectorAll("input, textarea, select")].map((f) => f.value),
                  JSON.stringify(sessionStorage), JSON.stringify(localStorage)].join("\\n")"""
    )
    return state


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with serve_fake_openai() as served:
        served.require_key = PROVIDER_KEY
        yield served


def test_an_admin_adds_a_provider_with_a_key_the_page_never_keeps(
    page: Page, server: Server, fake: FakeOpenAI
) -> None:
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto("/#/providers")
    expect(page.locator("nav a[aria-current='page']")).to_have_text("Providers")
    expect(page.locator("#providers")).to_contain_text("No provider yet")
    routing = page.locator("#provider-routing")
    expect(routing).to_contain_text("model_routing.prefer_local")
    expect(routing).to_contain_text("model_routing.allowed_external_providers")

    page.locator("#provider-name").fill("openai")
    page.locator("#provider-base-url").fill("https://me:pw@api.openai.example/v1")
    page.locator("#provider-key").fill(PROVIDER_KEY)
    page.get_by_role("button", name="Add provider").click()
    expect(page.locator("#errors")).to_contain_text("a base URL may not carry a user or password")
    expect(page.locator("#provider-key")).to_have_value("")  # not kept, even when refused

    page.locator("#provider-base-url").fill(fake.base_url)
    page.locator("#provider-models").fill("gpt-4o, gpt-4o-mini")
    page.locator("#provider-subjects").fill("role:admin, task")
    page.locator("#provider-key").fill(PROVIDER_KEY)
    page.get_by_role("button", name="Add provider").click()
    row = page.locator("tr[data-provider='openai']")
    expect(row.locator(".provider-key")).to_have_text("set")
    expect(row).to_contain_text("gpt-4o, gpt-4o-mini")
    expect(row).to_contain_text("role:admin, task")
    expect(page.locator("#errors")).to_be_empty()
    row.get_by_role("button", name="Test").click()
    expect(row.locator(".provider-test")).to_contain_text("reachable (HTTP 200")
    expect(row.locator(".provider-test")).to_contain_text("lists 2 models: fake-model, fake-model-large")
    assert PROVIDER_KEY not in page_state(page)
    shot(page, "providers")

    row.get_by_role("button", name="Change key").click()
    row.get_by_label("new key of openai").fill(NEW_KEY)
    row.get_by_role("button", name="Save key").click()
    expect(row.locator(".provider-new-key")).to_have_count(0)  # the row was drawn again, without it
    expect(row.locator(".provider-key")).to_have_text("set")
    row.get_by_role("button", name="Test").click()  # the fake wants the first key: the new one is refused
    expect(row.locator(".provider-test")).to_contain_text("not reachable (HTTP 401)")
    assert NEW_KEY not in page_state(page)

    row.get_by_role("button", name="Clear key").click()
    expect(row.locator(".provider-key")).to_have_text("unset")
    expect(row.get_by_role("button", name="Clear key")).to_have_count(0)
    row.get_by_role("button", name="Remove").click()
    expect(page.locator("#providers")).to_contain_text("No provider yet")

    page.locator("#routing-settings").click()
    expect(page.locator("nav a[aria-current='page']")).to_have_text("Settings")
    actions = [event["action"] for event in server.client.get("/api/v1/audit").json()]
    assert {"providers.add", "providers.key", "providers.remove"} <= set(actions)
