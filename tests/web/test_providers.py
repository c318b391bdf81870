"""``/api/v1/providers`` in process (the app with its lifespan, auth on): admins add, list, change
and remove providers; a key goes in and never comes out; a user's key is refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from litestar.testing import TestClient

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import ServerSettings, Settings
from appliance.web.app import create_app
from tests.conftest import free_port
from tests.egress.fakes import serve_fake_openai
from tests.web.conftest import PASSWORD

# Litestar warns, as the app is made, of dependencies other modules declare.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROVIDER_KEY = "sk-test-api-key-0123456789"
NEW_KEY = "sk-test-api-key-replaced-42"


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    admin: dict[str, str]  # headers
    user: dict[str, str]
    seen: list[str]  # every answer's text, to look for keys in

    def call(self, method: str, path: str, *, as_user: bool = False, **kwargs: object) -> object:
        headers = self.user if as_user else self.admin
        response = self.client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
        self.seen.append(response.text + str(response.headers))
        return response


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One app for the module (tests use their own provider names), with an admin and a user."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), server=ServerSettings(auth="on"))
    runtime = Runtime.open(settings)
    try:
        context = Context.cli()
        runtime.auth.add_user("root", "admin", PASSWORD, context)
        runtime.auth.add_user("alice", "user", PASSWORD, context)
        admin = runtime.auth.create_key(context, user="root").key
        user = runtime.auth.create_key(context, user="alice").key
    finally:
        runtime.close()
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        yield Api(
            client,
            {"authorization": f"Bearer {admin}"},
            {"authorization": f"Bearer {user}"},
            [],
        )


def test_an_admin_adds_lists_changes_and_removes_a_provider(api: Api) -> None:
    body = {
        "name": "openai",
        "kind": "openai",
        "base_url": "https://api.openai.example/v1/",
        "models": ["gpt-4o"],
        "key": PROVIDER_KEY,
    }
    added = api.call("POST", "/api/v1/providers", json=body)
    assert added.status_code == 201, added.text
    assert added.json()["key_set"] is True
    assert added.json()["base_url"] == "https://api.openai.example/v1"
    assert added.json()["operations"] == ["chat", "complete", "embed", "models"]
    assert "key" not in added.json()
    listed = api.call("GET", "/api/v1/providers").json()
    assert [(p["name"], p["kind"], p["subjects"], p["key_set"]) for p in listed if p["name"] == "openai"] == [
        ("openai", "openai", ["*"], True)
    ]

    cleared = api.call(
        "PATCH", "/api/v1/providers/openai", json={"subjects": ["role:admin"], "models": [], "key": None}
    ).json()
    assert (cleared["subjects"], cleared["models"], cleared["key_set"]) == (["role:admin"], [], False)
    kept = api.call("PATCH", "/api/v1/providers/openai", json={"operations": ["chat"]}).json()
    assert (kept["operations"], kept["key_set"]) == (["chat"], False)  # key absent: left as it was
    reset = api.call("PATCH", "/api/v1/providers/openai", json={"key": NEW_KEY}).json()
    assert (reset["key_set"], reset["subjects"]) == (True, ["role:admin"])
    assert api.call("GET", "/api/v1/providers/openai").json() == reset

    actions = [
        (event["action"], event["actor"], event["detail"].get("key"))
        for event in api.call("GET", "/api/v1/audit", params={"limit": 20}).json()
        if event["target"] == "openai"
    ]
    assert actions[::-1] == [
        ("providers.add", "user:root", "set"),
        ("providers.update", "user:root", None),
        ("providers.key", "user:root", "cleared"),
        ("providers.update", "user:root", None),
        ("providers.key", "user:root", "set"),
    ]

    removed = api.call("DELETE", "/api/v1/providers/openai")
    assert removed.status_code == 204
    missing = api.call("GET", "/api/v1/providers/openai")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.json()["code"] == "provider_not_found"
    assert "appliance providers ls" in missing.json()["hint"]
    assert api.call("DELETE", "/api/v1/providers/openai").json()["code"] == "provider_not_found"
    everything = "".join(api.seen)
    assert PROVIDER_KEY not in everything
    assert NEW_KEY not in everything


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "says"),
    [
        (
            "POST",
            "",
            {"name": "dup", "base_url": "https://x.example"},
            409,
            "provider_exists",
            "already exists",
        ),
        (
            "POST",
            "",
            {"name": "x", "base_url": "https://x.example", "api_key": "k"},
            400,
            "invalid_input",
            "api_key",
        ),
        ("POST", "", {"name": "Bad/Name", "base_url": "https://x.example"}, 400, "invalid_input", "name"),
        (
            "POST",
            "",
            {"name": "x", "kind": "gemini", "base_url": "https://x.example"},
            400,
            "invalid_input",
            "kind",
        ),
        (
            "POST",
            "",
            {"name": "x", "base_url": "https://u:p@x.example"},
            400,
            "invalid_input",
            "user or password",
        ),
        (
            "POST",
            "",
            {"name": "x", "base_url": "https://x.example", "key": "a b"},
            400,
            "invalid_input",
            "one line",
        ),
        (
            "POST",
            "",
            {"name": "x", "base_url": "https://x.example", "models": {}},
            400,
            "invalid_input",
            "models",
        ),
        ("PATCH", "/dup", {"models": "gpt-4o"}, 400, "invalid_input", "models"),
        ("PATCH", "/dup", {}, 400, "invalid_input", "nothing to change"),
        ("PATCH", "/dup", {"kind": "anthropic"}, 400, "invalid_input", "kind"),
        ("PATCH", "/dup", {"operations": ["images"]}, 400, "invalid_input", "operations"),
        ("PATCH", "/dup", {"subjects": ["everyone"]}, 400, "invalid_input", "not a subject"),
        ("PATCH", "/dup", {"key": ""}, 400, "invalid_input", "the provider key is empty"),
        ("PATCH", "/nope", {"key": None}, 404, "provider_not_found", "no provider named 'nope'"),
    ],
)
def test_bad_requests_say_what_is_wrong_and_change_nothing(
    api: Api, method: str, path: str, body: dict[str, object], status: int, code: str, says: str
) -> None:
    if api.call("GET", "/api/v1/providers/dup").status_code == 404:
        api.call(
            "POST",
            "/api/v1/providers",
            json={"name": "dup", "base_url": "https://dup.example", "key": "sk-1"},
        )
    before = api.call("GET", "/api/v1/providers").json()
    answer = api.call(method, f"/api/v1/providers{path}", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code
    assert says in answer.text
    assert api.call("GET", "/api/v1/providers").json() == before


def test_a_user_may_neither_read_nor_manage_providers(api: Api) -> None:
    for method, path in [
        ("GET", "/api/v1/providers"),
        ("GET", "/api/v1/providers/dup"),
        ("POST", "/api/v1/providers"),
        ("PATCH", "/api/v1/providers/dup"),
        ("DELETE", "/api/v1/providers/dup"),
        ("POST", "/api/v1/providers/dup/test"),
    ]:
        refused = api.call(method, path, as_user=True, json={"name": "u", "base_url": "https://u.example"})
        assert refused.status_code == 403, (method, path)
        assert refused.json()["code"] == "forbidden"
    anonymous = api.client.get("/api/v1/providers")
    assert anonymous.status_code == 401


def test_a_test_fetches_the_model_list_with_the_key(api: Api) -> None:
    with serve_fake_openai() as fake:
        fake.require_key = PROVIDER_KEY
        body = {"name": "fake", "base_url": fake.base_url, "key": PROVIDER_KEY}
        assert api.call("POST", "/api/v1/providers", json=body).status_code == 201
        probe = api.call("POST", "/api/v1/providers/fake/test")
        assert probe.status_code == 200, probe.text
        assert {k: probe.json()[k] for k in ("ok", "status", "models", "error")} == {
            "ok": True,
            "status": 200,
            "models": ["fake-model", "fake-model-large"],
            "error": None,
        }
        assert fake.received("/v1/models")[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    nobody = {"name": "nobody", "base_url": f"http://127.0.0.1:{free_port()}/v1"}  # nothing listens
    assert api.call("POST", "/api/v1/providers", json=nobody).status_code == 201
    gone = api.call("POST", "/api/v1/providers/nobody/test").json()
    assert (gone["ok"], gone["status"], gone["models"]) == (False, None, [])
    assert gone["error"]
    assert api.call("POST", "/api/v1/providers/nope/test").json()["code"] == "provider_not_found"
    assert PROVIDER_KEY not in "".join(api.seen)
