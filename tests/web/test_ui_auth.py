"""Signing in to the browser UI, in real headless Chromium against a real server with auth on: the
login page, the setup of the first admin, the session's CSRF token on every change, what a
``user`` sees, keys, log-out and an expired session."""

from __future__ import annotations

import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server, import_file
from tests.fileserver import Faults, serve_files
from tests.tiny_model import write_llama_gguf
from tests.web.browsing import browser, opened, shot, sign_in
from tests.web.conftest import PASSWORD, Keys

__all__ = ["browser"]  # a fixture this module uses from browsing


@pytest.fixture
def page(browser: Browser, keys: Keys, server: Server) -> Iterator[Page]:
    """A fresh tab (no cookie) on a server with auth on, an admin ``root`` and a user ``alice``."""
    with opened(browser, server.url) as fresh:
        yield fresh


def test_sign_in_make_a_key_revoke_it_and_log_out(page: Page, server: Server) -> None:
    page.goto("/#/keys")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    expect(page.get_by_role("navigation")).to_be_hidden()
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill("not her password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#errors")).to_contain_text("wrong user name or password")
    expect(page.get_by_label("Password")).to_be_empty()
    shot(page, "login-failed")
    sign_in(page, "alice", PASSWORD)
    expect(page.locator("#errors")).to_be_empty()
    expect(page.locator("#account-name")).to_have_text("alice (user)")
    expect(page.get_by_role("heading", level=1)).to_have_text("My keys")  # the page the address asked for
    page.fill("#key-name", "laptop")
    page.select_option("#key-expires", "30d")
    page.get_by_role("button", name="Create key").click()  # a POST: the session's CSRF token goes with it
    secret = page.locator("#new-key-secret")
    expect(secret).to_contain_text("apl_")
    made = secret.inner_text()
    row = page.locator("#keys tr", has_text="laptop")
    expect(row).to_contain_text(made[:10] + "…")
    expect(row).to_contain_text("active")
    expect(page.locator("#keys")).not_to_contain_text(made)  # the list never shows a secret
    expect(page.locator("#keys tbody tr", has_text="root")).to_have_count(0)  # alice sees only her own
    shot(page, "keys")
    assert (
        server.client.get("/api/v1/me", headers={"Authorization": f"Bearer {made}"}).json()["name"] == "alice"
    )

    page.reload()  # still signed in (the cookie); the CSRF token comes again from /api/v1/me
    expect(page.locator("#account-name")).to_have_text("alice (user)")
    expect(page.locator("#new-key-secret")).to_have_count(0)  # the new secret is gone for good
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    expect(page.locator("#errors")).to_be_empty()

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    expect(page.locator("#login-message")).to_have_text("You have logged out.")
    assert page.request.get(f"{server.url}/api/v1/me").status == 401  # the cookie is gone


def test_the_csrf_token_is_required_with_the_cookie(page: Page, server: Server) -> None:
    page.goto("/")
    sign_in(page, "alice", PASSWORD)
    answers = page.evaluate(
        """async () => {
          const post = (headers) => fetch("/api/v1/keys", { method: "POST", body: "{}",
            headers: { "content-type": "application/json", ...headers } });
          const me = await (await fetch("/api/v1/me")).json();
          const bare = await post({});
          const signed = await post({ "x-csrf-token": me.csrf_token });
          return [bare.status, (await bare.json()).code, signed.status];
        }"""
    )
    assert answers == [403, "csrf_failed", 201]


@pytest.fixture
def two_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a server started after this: a lockout after two failed logins."""
    monkeypatch.setenv("APPLIANCE_SERVER__LOGIN_ATTEMPTS", "2")


def test_too_many_wrong_passwords_say_how_long_to_wait(two_attempts: None, page: Page) -> None:
    page.goto("/")
    for _ in range(3):
        page.get_by_label("User name").fill("root")
        page.get_by_label("Password").fill("guessing")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#errors")).not_to_be_empty()
    expect(page.locator("#errors")).to_have_text(re.compile(r"^too many attempts, try again in [1-9]\d* s$"))
    shot(page, "login-locked")


def test_a_user_sees_models_read_only_and_no_admin_page(
    page: Page, server: Server, keys: Keys, data_dir: Path, tiny_gguf: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    page.goto("/")
    sign_in(page, "alice", PASSWORD)
    expect(page.get_by_role("heading", level=1)).to_have_text("Models")  # a user's home: no dashboard
    nav = page.get_by_role("navigation")
    expect(nav.get_by_role("link")).to_have_text(["Models", "Chat", "Tasks", "MCP", "My keys"])
    row = page.locator("#models-table tr[data-model='tiny:latest']")
    expect(row).to_contain_text("gguf")
    expect(row.get_by_role("button")).to_have_count(0)
    expect(page.locator("#pull-form")).to_have_count(0)
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "models-as-user")

    nav.get_by_role("link", name="Chat").click()  # inference is a user's: the POST carries the CSRF token
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-log .assistant")).not_to_be_empty()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=60_000)
    expect(page.locator("#errors")).to_be_empty()

    for route in ("users", "audit", "settings", ""):
        page.goto(f"/#/{route}")
        expect(page.get_by_role("heading", level=1)).to_have_text("Models" if route == "" else "Admins only")
    answers = page.evaluate(
        """async () => {
          const me = await (await fetch("/api/v1/me")).json();
          const listed = await fetch("/api/v1/users");
          const added = await fetch("/api/v1/users", { method: "POST",
            headers: { "content-type": "application/json", "x-csrf-token": me.csrf_token },
            body: JSON.stringify({ name: "mallory", role: "admin" }) });
          return [listed.status, added.status, (await added.json()).code];
        }"""
    )
    assert answers == [403, 403, "forbidden"]
    assert "mallory" not in server.client.get("/api/v1/users", headers={"x-api-key": keys.admin}).text


def test_an_admin_adds_and_removes_users_from_the_page(page: Page) -> None:
    page.goto("/")
    sign_in(page, "root", PASSWORD)
    expect(page.locator("#account-name")).to_have_text("root (admin)")
    expect(page.locator("#readiness")).to_be_visible()  # the dashboard is an admin's home
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


def test_live_downloads_and_bundles_work_through_the_cookie(page: Page, tmp_path: Path) -> None:
    """EventSource and a download link cannot send an API key; the session cookie goes with both,
    and the bundle upload (XHR, not fetch) carries the CSRF token."""
    content = write_llama_gguf(tmp_path / "served.gguf", padding_bytes=3 * 1024 * 1024).read_bytes()
    page.goto("/#/models")
    sign_in(page, "root", PASSWORD)
    with serve_files() as files:
        url = files.add("/models/live.gguf", content, Faults(bytes_per_second=256 * 1024))
        page.get_by_label("Pull a reference").fill(url)
        page.get_by_role("button", name="Pull").click()
        running = page.locator("#downloads-table tr[data-state='running']")
        expect(running).to_contain_text(re.compile(r"[1-9][0-9.]* [KM]B of 3\.6 MB"))  # the event stream's
        expect(page.locator("#downloads-table tr[data-state='done']")).to_be_visible(timeout=60_000)
    expect(page.locator("#models-table tr[data-model='live:latest']")).to_be_visible()
    with page.expect_download() as started:
        page.get_by_role("button", name="Export bundle (selected, or all)").click()
    assert started.value.failure() is None
    saved = started.value.path()
    assert tarfile.is_tarfile(saved)
    with tarfile.open(saved) as tar:
        assert "index.json" in tar.getnames()
    page.get_by_label("Import a bundle (.tar)").set_input_files(saved)  # a POST: with the CSRF token
    page.get_by_role("button", name="Import bundle").click()
    expect(page.locator("#bundle-status")).to_contain_text("imported live:latest (already present)")
    expect(page.locator("#errors")).to_be_empty()


def test_a_key_only_user_signs_in_with_an_api_key(page: Page, keys: Keys) -> None:
    page.goto("/")
    page.get_by_role("button", name="Use an API key instead").click()
    page.get_by_label("API key").fill(keys.revoked)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#login-message")).to_contain_text("the API key was refused")
    page.get_by_role("button", name="Use an API key instead").click()
    page.get_by_label("API key").fill(keys.user)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#account-name")).to_have_text("alice (user)")
    page.get_by_role("link", name="My keys").click()
    expect(page.locator("#keys tbody tr")).to_have_count(2)  # her key and the revoked one
    page.reload()  # the tab keeps the key until it closes
    expect(page.locator("#account-name")).to_have_text("alice (user)")
    page.get_by_role("button", name="Log out").click()  # forgets the key
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    page.reload()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")


@pytest.fixture
def short_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a server started after this: a browser login lasts two seconds."""
    monkeypatch.setenv("APPLIANCE_SERVER__SESSION_TTL", "2s")


def test_an_expired_session_returns_to_the_login_page(short_sessions: None, page: Page) -> None:
    page.goto("/#/models")
    sign_in(page, "root", PASSWORD)
    expect(page.locator("#models")).not_to_contain_text("Loading")
    page.wait_for_timeout(2500)
    page.goto("/#/chat")  # what the Chat link does; its call finds the session over
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    expect(page.locator("#login-message")).to_have_text("Your session expired: sign in again.")
    expect(page.locator("#errors")).to_be_empty()
    shot(page, "login-expired")
    sign_in(page, "root", PASSWORD)
    expect(page.get_by_role("heading", level=1)).to_have_text("Chat")  # back where the tab was going


@pytest.fixture
def no_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a server started after this: auth on, and no user at all."""
    monkeypatch.setenv("APPLIANCE_SERVER__AUTH", "on")


def setup_token(server: Server) -> str:
    """The token ``appliance serve`` printed (once) as it started."""
    found: list[str] = []

    def read() -> None:
        assert server.process.stdout is not None
        for line in server.process.stdout:
            match = re.search(r"setup token:? (\S+)", line)
            if match:
                found.append(match.group(1))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert found, "appliance serve printed no setup token"
    return found[0]


def test_the_first_admin_is_made_with_the_setup_token(
    no_admin: None, browser: Browser, server: Server
) -> None:
    token = setup_token(server)
    with opened(browser, server.url) as page:
        page.goto("/")
        expect(page.get_by_role("heading", level=1)).to_have_text("Create the first admin")
        page.get_by_label("Setup token").fill("not-the-token")
        page.get_by_label("Admin's user name").fill("root")
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        page.get_by_label("Password again").fill(PASSWORD + "!")
        page.get_by_role("button", name="Create the admin and sign in").click()
        expect(page.locator("#errors")).to_contain_text("the two passwords differ")
        page.get_by_label("Password again").fill(PASSWORD)
        page.get_by_role("button", name="Create the admin and sign in").click()
        expect(page.locator("#errors")).to_contain_text("that is not this server's setup token")
        shot(page, "setup")
        page.get_by_label("Setup token").fill(token)
        page.get_by_role("button", name="Create the admin and sign in").click()
        expect(page.locator("#account-name")).to_have_text("root (admin)")
        expect(page.locator("#readiness")).to_be_visible()
        expect(page.locator("#errors")).to_be_empty()
        page.get_by_role("button", name="Log out").click()
        sign_in(page, "root", PASSWORD)  # a login like any other's from now on
        page.get_by_role("button", name="Log out").click()
    assert (
        server.client.post(
            "/api/v1/setup", json={"token": token, "name": "eve", "password": PASSWORD}
        ).status_code
        == 409
    )
