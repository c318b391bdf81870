"""Real headless Chromium (Debian's, driven by Playwright) for the UI tests: the browser, a page
that fails its test when the strict CSP blocks anything, screenshots, and signing in.

Screenshots land in test-artifacts/ui/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Server

__all__ = ["ARTIFACTS", "browser", "csp_violations", "opened", "page", "shot", "sign_in"]

ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield launched
        launched.close()


def csp_violations(page: Page) -> list[str]:
    """The Content-Security-Policy refusals Chromium reports on the page's console, as they come."""
    seen: list[str] = []
    page.on(
        "console",
        lambda message: seen.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return seen


@contextmanager
def opened(browser: Browser, url: str) -> Iterator[Page]:
    """A page in a fresh context (no cookies) on ``url``; on the way out, the CSP refused nothing."""
    context = browser.new_context(base_url=url, viewport={"width": 1366, "height": 800})
    page = context.new_page()
    page.set_default_timeout(20_000)
    violations = csp_violations(page)
    yield page
    context.close()
    assert violations == []


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    with opened(browser, server.url) as fresh:
        yield fresh


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, name: str, password: str) -> None:
    """The login page's form, filled and sent; returns once the header names who signed in."""
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#account-name")).to_contain_text(name)
