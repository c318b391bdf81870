"""API keys against a real ``appliance serve`` with ``server.auth`` on: every route, every way a
key can fail, the roles, and the real ``openai`` and ``ollama`` clients."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import ollama
import openai
import pytest

from appliance.auth.policy import decide
from appliance.identity import Actor
from appliance.settings import Settings
from appliance.web.app import create_app
from appliance.web.auth import ROUTE_ACTIONS
from tests.conftest import APPLIANCE, Server, free_port, import_file
from tests.web.conftest import PASSWORD, Keys

# A value for each path parameter: enough to reach the handler (which may then say 404 or 400).
PARAMS = {
    "name": "nope:latest",
    "download_id": "nope",
    "key": "offline",
    "file_path": "app.js",
    "path": "swagger",
    "digest": "sha256:" + "0" * 64,
    "key_id": "nope",
    "task_id": "nope",
    "node_ref": "nope",
    "token_id": "nope",
    "work_id": "nope",
    "model": "nope",
}


@pytest.fixture
def secured(keys: Keys, server: Server) -> Server:
    return server


def _routes() -> list[tuple[str, str]]:
    return sorted(key for key in ROUTE_ACTIONS)


def _call(server: Server, method: str, template: str, headers: dict[str, str]) -> int:
    path = re.sub(r"\{(\w+)\}", lambda found: PARAMS[found.group(1)], template)
    body = {} if method in ("POST", "PUT", "PATCH") else None
    # Streamed: the downloads' event stream never ends, and only the status matters here.
    with server.client.stream(method, path, json=body, headers=headers) as response:
        return response.status_code


# Built in this process (the tests' filter makes warnings errors), Litestar warns about handlers
# other modules declare; the walk only reads the route table.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_route_of_the_app_has_an_action(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    served = {(method, route.path_format) for route in app.routes for method in route.methods}
    # OPTIONS is answered before any check; HEAD is GET's where the path has a GET.
    served = {
        (method, path)
        for method, path in served
        if method != "OPTIONS" and not (method == "HEAD" and ("GET", path) in served)
    }
    assert served - set(ROUTE_ACTIONS) == set(), "routes without a policy action"
    assert set(ROUTE_ACTIONS) - served == set(), "actions for routes that do not exist"


def test_every_route_answers_each_failed_key_with_401_or_403(secured: Server, keys: Keys) -> None:
    user = Actor("alice", "user", "user")
    for method, template in _routes():
        action = ROUTE_ACTIONS[(method, template)]
        where = f"{method} {template}"
        if action == "public":
            assert _call(secured, method, template, {}) not in (401, 403), where
            continue
        for headers in (
            {},
            {"Authorization": "Bearer apl_wrong"},
            {"x-api-key": "not-even-a-key"},
            {"Authorization": f"Bearer {keys.revoked}"},
            {"Authorization": f"Bearer {keys.expired}"},
        ):
            assert _call(secured, method, template, headers) == 401, f"{where} {headers}"
        status = _call(secured, method, template, {"Authorization": f"Bearer {keys.user}"})
        assert (status == 403) is (not decide(user, action)), f"{where}: user key got {status}"
        status = _call(secured, method, template, {"x-api-key": keys.admin})
        if action in ("cluster.node", "blobs.read"):  # a worker's (or peer's) credential, not a key
            assert status == 401, f"{where}: admin key got {status}"
        else:
            assert status not in (401, 403), f"{where}: admin key got {status}"


def test_a_browser_session_changes_nothing_without_its_csrf_token_or_from_another_site(
    secured: Server,
) -> None:
    login = secured.client.post("/api/v1/login", json={"name": "root", "password": PASSWORD})
    cookie = {"Cookie": f"appliance_session={login.cookies['appliance_session']}"}
    csrf = login.json()["csrf_token"]
    secured.client.cookies.clear()  # each call below names its own credentials
    changes = [
        (method, template)
        for method, template in _routes()
        if method not in ("GET", "HEAD") and ROUTE_ACTIONS[(method, template)] != "public"
    ]
    assert len(changes) > 20
    for method, template in changes:
        where = f"{method} {template}"
        assert _call(secured, method, template, cookie) == 403, f"{where} without the CSRF token"
        cross_site = {**cookie, "X-CSRF-Token": csrf, "Origin": "https://evil.example"}
        assert _call(secured, method, template, cross_site) == 403, f"{where} from another site"
    assert _call(secured, "GET", "/api/v1/me", cookie) == 200  # the session itself still works


def test_a_401_names_the_scheme_and_a_403_the_reason_which_is_audited(secured: Server, keys: Keys) -> None:
    missing = secured.client.get("/api/v1/models")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["code"] == "unauthorized"
    # Each surface shapes it its own way.
    assert secured.client.get("/v1/models").json()["error"]["code"] == "unauthorized"
    assert "API key" in secured.client.get("/api/tags").json()["error"]
    revoked = secured.client.get("/api/v1/me", headers={"Authorization": f"Bearer {keys.revoked}"})
    assert "revoked" in revoked.json()["detail"]
    denied = secured.client.get("/api/v1/audit", headers={"Authorization": f"Bearer {keys.user}"})
    assert denied.status_code == 403
    assert "needs the admin role" in denied.json()["detail"]
    admin = {"Authorization": f"Bearer {keys.admin}"}
    audit = secured.client.get("/api/v1/audit", headers=admin).json()
    actions = {(event["action"], event["actor"]) for event in audit}
    assert ("auth.denied", "user:alice") in actions
    assert ("auth.failed", "api:127.0.0.1") in actions
    assert ("keys.revoke", next(e["actor"] for e in audit if e["action"] == "keys.revoke")) in actions
    me = secured.client.get("/api/v1/me", headers=admin).json()
    assert (me["actor"], me["role"], me["auth"]) == ("user:root", "admin", True)


def test_users_manage_their_own_keys_and_admins_everyones(secured: Server, keys: Keys) -> None:
    user = {"Authorization": f"Bearer {keys.user}"}
    admin = {"Authorization": f"Bearer {keys.admin}"}
    made = secured.client.post("/api/v1/keys", json={"name": "laptop", "expires": "30d"}, headers=user)
    assert made.status_code == 201
    new = made.json()
    assert new["key"].startswith("apl_")
    assert (new["user"], new["role"]) == ("alice", "user")
    listed = secured.client.get("/api/v1/keys", headers=user).json()
    assert {key["user"] for key in listed} == {"alice"}
    assert all("key" not in key for key in listed)  # the secret was shown once
    # Not someone else's key, not a bigger role than their own.
    assert secured.client.post("/api/v1/keys", json={"user": "root"}, headers=user).status_code == 403
    assert secured.client.post("/api/v1/keys", json={"role": "admin"}, headers=user).status_code == 400
    roots = [key for key in secured.client.get("/api/v1/keys", headers=admin).json() if key["user"] == "root"]
    assert secured.client.delete(f"/api/v1/keys/{roots[0]['id']}", headers=user).status_code == 403
    # The new key works until revoked, then gets 401 at once.
    mine = {"x-api-key": new["key"]}
    assert secured.client.get("/api/v1/me", headers=mine).json()["name"] == "alice"
    assert secured.client.delete(f"/api/v1/keys/{new['id']}", headers=user).json()["state"] == "revoked"
    assert secured.client.get("/api/v1/me", headers=mine).status_code == 401
    assert secured.client.delete("/api/v1/keys/nope", headers=admin).status_code == 404


def test_admins_manage_users_over_the_api(secured: Server, keys: Keys) -> None:
    admin = {"Authorization": f"Bearer {keys.admin}"}
    added = secured.client.post("/api/v1/users", json={"name": "bob", "password": PASSWORD}, headers=admin)
    assert (added.status_code, added.json()["role"]) == (201, "user")
    again = secured.client.post("/api/v1/users", json={"name": "bob"}, headers=admin)
    assert (again.status_code, again.json()["code"]) == (409, "user_exists")
    weak = secured.client.put("/api/v1/users/bob/password", json={"password": "short"}, headers=admin)
    assert weak.status_code == 400
    assert "password" in weak.json()["detail"]
    demoted = secured.client.put("/api/v1/users/bob/role", json={"role": "node"}, headers=admin)
    assert demoted.json()["role"] == "node"
    names = [user["name"] for user in secured.client.get("/api/v1/users", headers=admin).json()]
    assert names == ["alice", "bob", "root"]
    assert secured.client.delete("/api/v1/users/bob", headers=admin).status_code == 200
    assert secured.client.delete("/api/v1/users/bob", headers=admin).status_code == 404
    # A user's key never does more than the user may now.
    secured.client.post("/api/v1/users", json={"name": "carol", "role": "admin"}, headers=admin)
    made = secured.client.post("/api/v1/keys", json={"user": "carol"}, headers=admin).json()
    carol = {"x-api-key": made["key"]}
    assert secured.client.get("/api/v1/audit", headers=carol).status_code == 200
    secured.client.put("/api/v1/users/carol/role", json={"role": "user"}, headers=admin)
    assert secured.client.get("/api/v1/audit", headers=carol).status_code == 403
    assert secured.client.get("/api/v1/me", headers=carol).json()["role"] == "user"


def test_the_site_may_let_users_pull(secured: Server, keys: Keys) -> None:
    user = {"Authorization": f"Bearer {keys.user}"}
    admin = {"Authorization": f"Bearer {keys.admin}"}
    body = {"ref": "https://127.0.0.1:1/none.gguf"}
    assert secured.client.post("/api/v1/models/pull", json=body, headers=user).status_code == 403
    granted = {"value": ["admin", "user"]}
    path = "/api/v1/preferences/models.download.allowed_roles"
    assert secured.client.put(path, json=granted, headers=admin).status_code == 200
    assert secured.client.post("/api/v1/models/pull", json=body, headers=user).status_code not in (401, 403)


@pytest.fixture
def tiny_secured(keys: Keys, data_dir: Path, tiny_gguf: Path, server: Server) -> Server:
    import_file(data_dir, tiny_gguf, "tiny")
    return server


def test_the_openai_client_chats_with_a_key_and_is_refused_without(tiny_secured: Server, keys: Keys) -> None:
    with openai.OpenAI(base_url=f"{tiny_secured.url}/v1", api_key=keys.user, max_retries=0) as client:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert reply.choices[0].message.role == "assistant"
    with (
        openai.OpenAI(base_url=f"{tiny_secured.url}/v1", api_key="apl_bad", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.models.list()


def test_the_ollama_client_chats_with_a_key_and_is_refused_without(tiny_secured: Server, keys: Keys) -> None:
    headers = {"Authorization": f"Bearer {keys.user}"}
    with ollama.Client(host=tiny_secured.url, headers=headers, timeout=60) as client:
        messages = [{"role": "user", "content": "hello"}]
        reply = client.chat(model="tiny", messages=messages, options={"num_predict": 4})
        assert reply.message.role == "assistant"
    with ollama.Client(host=tiny_secured.url, headers={"Authorization": "Bearer apl_bad"}) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            client.list()
        assert caught.value.status_code == 401


def test_the_cli_sends_appliance_api_key(tiny_secured: Server, keys: Keys, cli: object) -> None:
    port = tiny_secured.url.rsplit(":", 1)[1]
    refused = cli("ps", "--port", port)  # type: ignore[operator]
    assert refused.returncode == 1
    assert "API key" in refused.stderr
    allowed = cli("ps", "--port", port, env={"APPLIANCE_API_KEY": keys.admin})  # type: ignore[operator]
    assert allowed.returncode == 0, allowed.stderr


def test_with_auth_on_any_address_may_be_bound(data_dir: Path, keys: Keys) -> None:
    """Keys make binding beyond loopback safe to allow (plain HTTP there still needs its own flag)."""
    every = "0.0.0.0"
    serve = ["serve", "--host", every, "--port", str(free_port()), "--insecure-http"]
    process = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        output = process.stdout.readline() + process.stdout.readline()  # the warning, then the address
        assert "serving on http://0.0.0.0" in output
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]


def test_without_auth_loopback_needs_no_key(server: Server) -> None:
    me = server.client.get("/api/v1/me").json()
    assert (me["actor"], me["role"], me["auth"]) == ("api:127.0.0.1", "admin", False)
    ignored = {"Authorization": "Bearer apl_ignored"}  # as the openai client always sends one
    assert server.client.get("/api/v1/models", headers=ignored).status_code == 200
