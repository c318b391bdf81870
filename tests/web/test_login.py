"""Browser logins against a real ``appliance serve`` with auth on: the session cookie, CSRF,
logout, expiry, the brake on guessing, and the setup token that makes the first admin."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import httpx
import pytest

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.conftest import Server
from tests.web.conftest import PASSWORD, Keys
from tests.web.serving import serving

ROOT = {"name": "root", "password": PASSWORD}
ALICE = {"name": "alice", "password": PASSWORD}


@pytest.fixture
def server_env() -> dict[str, str]:
    """Settings for the server, by environment; a test parametrizes it to change them."""
    return {}


@pytest.fixture
def secured(
    keys: Keys, server_env: dict[str, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Server:
    """Auth on with an admin (root) and a user (alice)."""
    for name, value in server_env.items():
        monkeypatch.setenv(name, value)
    server: Server = request.getfixturevalue("server")
    return server


def _browser(server: Server, *, source: str = "127.0.0.1") -> httpx.Client:
    """A client with its own cookie jar, connecting from ``source`` (any 127/8 address works)."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=server.url, timeout=30, transport=transport)


def _audit(server: Server, keys: Keys) -> list[dict[str, object]]:
    events: list[dict[str, object]] = server.client.get(
        "/api/v1/audit", params={"limit": 500}, headers={"x-api-key": keys.admin}
    ).json()
    return events


def test_a_login_sets_a_strict_http_only_cookie_and_changes_need_its_csrf_token(
    secured: Server, keys: Keys
) -> None:
    with _browser(secured) as browser:
        wrong = browser.post("/api/v1/login", json={"name": "root", "password": "not the password"})
        assert (wrong.status_code, wrong.json()["detail"]) == (401, "wrong user name or password")
        assert "set-cookie" not in wrong.headers
        unknown = browser.post("/api/v1/login", json={"name": "nobody", "password": PASSWORD})
        assert unknown.json()["detail"] == "wrong user name or password"  # names are not revealed

        logged = browser.post("/api/v1/login", json=ROOT)
        assert logged.status_code == 200, logged.text
        cookie = logged.headers["set-cookie"]
        assert cookie.startswith("appliance_session=")
        assert {"HttpOnly", "SameSite=strict", "Path=/"} <= {part.strip() for part in cookie.split(";")}
        assert "Secure" not in cookie  # plain HTTP on loopback; test_lan covers HTTPS
        csrf = logged.json()["csrf_token"]
        me = browser.get("/api/v1/me").json()
        assert (me["name"], me["role"], me["session"], me["csrf_token"]) == ("root", "admin", True, csrf)

        before = len(browser.get("/api/v1/keys").json())
        refused = browser.post("/api/v1/keys", json={"name": "no token"})
        assert (refused.status_code, refused.json()["code"]) == (403, "csrf_failed")
        forged = browser.post("/api/v1/keys", json={"name": "forged"}, headers={"X-CSRF-Token": "guess"})
        assert forged.status_code == 403
        cross_site = browser.post(
            "/api/v1/keys",
            json={"name": "x"},
            headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
        )
        assert cross_site.status_code == 403
        assert len(browser.get("/api/v1/keys").json()) == before  # nothing was made
        made = browser.post("/api/v1/keys", json={"name": "from the browser"}, headers={"X-CSRF-Token": csrf})
        assert made.status_code == 201

        assert browser.post("/api/v1/logout").status_code == 403  # logout is a change too
        out = browser.post("/api/v1/logout", headers={"X-CSRF-Token": csrf})
        assert out.status_code == 200
        assert 'appliance_session=""' in out.headers["set-cookie"]
        assert browser.get("/api/v1/me").status_code == 401
        browser.cookies.set("appliance_session", logged.cookies["appliance_session"])
        reused = browser.get("/api/v1/me")  # the old cookie, kept by someone
        assert reused.status_code == 401
        assert "session has ended" in reused.json()["detail"]

    actions = {(event["action"], event["actor"], event["outcome"]) for event in _audit(secured, keys)}
    assert ("auth.login", "user:root", "ok") in actions
    assert ("auth.login", "api:127.0.0.1", "error") in actions
    assert ("auth.logout", "user:root", "ok") in actions


def test_a_user_session_cannot_do_admin_things(secured: Server) -> None:
    with _browser(secured) as browser:
        csrf = browser.post("/api/v1/login", json=ALICE).json()["csrf_token"]
        assert browser.get("/api/v1/models").status_code == 200
        assert browser.get("/api/v1/users").status_code == 403
        denied = browser.post("/api/v1/users", json={"name": "mallory"}, headers={"X-CSRF-Token": csrf})
        assert denied.status_code == 403
        assert "needs the admin role" in denied.json()["detail"]


@pytest.mark.parametrize(
    "server_env", [{"APPLIANCE_SERVER__LOGIN_ATTEMPTS": "3", "APPLIANCE_SERVER__LOGIN_LOCKOUT": "4s"}]
)
def test_failed_logins_lock_the_name_and_the_address_for_a_while(secured: Server, keys: Keys) -> None:
    wrong = {"name": "alice", "password": "guess guess guess"}
    with _browser(secured) as here, _browser(secured, source="127.0.0.2") as elsewhere:
        for _ in range(3):
            assert here.post("/api/v1/login", json=wrong).status_code == 401
        locked = here.post("/api/v1/login", json=ALICE)  # even the right password, now
        assert (locked.status_code, locked.json()["code"]) == (429, "too_many_attempts")
        assert 1 <= int(locked.headers["retry-after"]) <= 4
        # The name is locked from every address, and this address for every name.
        assert elsewhere.post("/api/v1/login", json=ALICE).status_code == 429
        assert here.post("/api/v1/login", json=ROOT).status_code == 429
        assert elsewhere.post("/api/v1/login", json=ROOT).status_code == 200
        time.sleep(4.2)
        assert elsewhere.post("/api/v1/login", json=ALICE).status_code == 200
    locks = {event["target"] for event in _audit(secured, keys) if event["action"] == "auth.locked"}
    assert locks == {"user:alice", "addr:127.0.0.1"}


@pytest.mark.parametrize("server_env", [{"APPLIANCE_SERVER__SESSION_TTL": "2s"}])
def test_a_session_expires(secured: Server) -> None:
    with _browser(secured) as browser:
        logged = browser.post("/api/v1/login", json=ROOT)
        assert "Max-Age=2" in logged.headers["set-cookie"]
        assert browser.get("/api/v1/me").status_code == 200
        session = logged.cookies["appliance_session"]
        time.sleep(2.2)
        browser.cookies.set("appliance_session", session)  # a client that ignores Max-Age
        expired = browser.get("/api/v1/me")
        assert expired.status_code == 401
        assert "expired" in expired.json()["detail"]


def test_a_new_password_ends_the_users_sessions(secured: Server, keys: Keys) -> None:
    with _browser(secured) as browser:
        browser.post("/api/v1/login", json=ALICE)
        assert browser.get("/api/v1/me").status_code == 200
        changed = secured.client.put(
            "/api/v1/users/alice/password",
            json={"password": "another long passphrase"},
            headers={"x-api-key": keys.admin},
        )
        assert changed.status_code == 200
        assert browser.get("/api/v1/me").status_code == 401


def test_logins_work_over_https_with_a_secure_cookie(data_dir: Path, keys: Keys, cli: object) -> None:
    assert cli("tls", "init").returncode == 0  # type: ignore[operator]
    ca = ssl.create_default_context(cafile=data_dir / "tls" / "ca.crt")
    with serving(data_dir, env=AUTH_ON, https=True, verify=ca) as server:
        logged = server.client.post("/api/v1/login", json=ROOT)
        assert logged.status_code == 200
        assert "Secure" in {part.strip() for part in logged.headers["set-cookie"].split(";")}
        assert server.client.get("/api/v1/me").json()["name"] == "root"


# -- the first admin ---------------------------------------------------------------------------


AUTH_ON = {"APPLIANCE_SERVER__AUTH": "on"}


def test_serve_with_no_admin_prints_a_one_time_setup_token(data_dir: Path) -> None:
    with serving(data_dir, env=AUTH_ON) as server:
        found = re.search(r"one-time setup token (\S+)", server.line_with("setup token"))
        assert found
        assert "appliance users add NAME --role admin" in server.line_with("users add")
        token = found.group(1)
        with httpx.Client(base_url=server.url, timeout=30) as browser:
            assert browser.get("/api/v1/login").json() == {"auth": True, "setup": True}
            assert browser.get("/api/v1/models").status_code == 401  # nothing else opens meanwhile
            body = {"token": token, "name": "root", "password": PASSWORD}
            wrong = browser.post("/api/v1/setup", json={**body, "token": "guessed"})
            assert wrong.status_code == 401
            weak = browser.post("/api/v1/setup", json={**body, "password": "short"})
            assert weak.status_code == 400
            assert browser.get("/api/v1/login").json()["setup"] is True  # still waiting, no user made
            made = browser.post("/api/v1/setup", json=body)
            assert made.status_code == 200, made.text
            assert made.json()["role"] == "admin"
            assert browser.get("/api/v1/me").json()["name"] == "root"  # logged in as well
            again = browser.post("/api/v1/setup", json={**body, "name": "second"})
            assert (again.status_code, again.json()["code"]) == (409, "conflict")
            assert browser.get("/api/v1/login").json() == {"auth": True, "setup": False}
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        assert [(user.name, user.role) for user in runtime.auth.list_users()] == [("root", "admin")]
        setups = runtime.store.list_audit(action="auth.setup", actor=None, since=None, until=None, limit=10)
        assert sorted(event.outcome for event in setups) == ["error", "error", "ok"]
    finally:
        runtime.close()


def test_serve_with_an_admin_prints_no_setup_token(data_dir: Path) -> None:
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        runtime.auth.add_user("root", "admin", PASSWORD, Context.cli())
    finally:
        runtime.close()
    with serving(data_dir, env=AUTH_ON) as server:
        server.line_with("serving on")
        with httpx.Client(base_url=server.url, timeout=30) as browser:
            assert browser.get("/api/v1/login").json() == {"auth": True, "setup": False}
            refused = browser.post("/api/v1/setup", json={"token": "x", "name": "two", "password": PASSWORD})
            assert refused.status_code == 409
    assert "setup token" not in "".join(server.output)
