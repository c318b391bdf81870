"""The MCP gateway with auth on, over HTTP with the official client: the route's own check (401,
audited as a denied MCP call), each tool's action per role, and the gateway switched off."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError

from appliance.audit import Context
from appliance.auth.policy import decide
from appliance.identity import Actor
from appliance.mcp.catalog import CATALOG
from appliance.mcp.types import TASK_ONLY_TOOLS
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.conftest import Server
from tests.mcp.conftest import call, checked, listed, mcp_rows, module_server, refusal
from tests.web.conftest import PASSWORD, isolated


@pytest.fixture(scope="module")
def keys(data_dir: Path) -> dict[str, str]:
    with isolated(data_dir.parent), pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_SERVER__AUTH", "on")
        runtime = Runtime.open(Settings(data_dir=data_dir))
        try:
            auth, context = runtime.auth, Context.cli()
            auth.add_user("root", "admin", PASSWORD, context)
            auth.add_user("alice", "user", PASSWORD, context)
            return {
                "admin": auth.create_key(context, user="root").key,
                "user": auth.create_key(context, user="alice").key,
            }
        finally:
            runtime.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp-auth") / "data"


@pytest.fixture(scope="module")
def server(data_dir: Path, keys: dict[str, str]) -> Iterator[Server]:
    with module_server(data_dir, APPLIANCE_SERVER__AUTH="on") as started:
        yield started


def _tools_call(name: str) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": {"key": "offline"}},
    }


def test_a_call_without_a_key_is_refused_at_the_route_and_audited_as_a_denied_call(
    server: Server, keys: dict[str, str]
) -> None:
    headers = {"accept": "application/json, text/event-stream"}
    for credentials in ({}, {"Authorization": "Bearer apl_wrong"}):
        answer = server.client.post(
            "/mcp", json=_tools_call("preference.get"), headers={**headers, **credentials}
        )
        assert answer.status_code == 401
        assert answer.json()["code"] == "unauthorized"
        row = mcp_rows(server, key=keys["admin"])[0]
        assert (row["target"], row["outcome"]) == ("preference.get", "error")
        assert row["detail"] == {**row["detail"], "result": "denied", "code": "unauthorized"}
    assert server.client.get("/api/v1/mcp/tools").status_code == 401
    metrics = server.client.get("/metrics", headers={"Authorization": f"Bearer {keys['admin']}"}).text
    assert 'appliance_mcp_calls_total{outcome="denied",tool="preference.get"} 2.0' in metrics


def test_a_browser_session_without_its_csrf_token_is_refused_and_audited(
    server: Server, keys: dict[str, str]
) -> None:
    with httpx.Client(base_url=server.url) as browser:
        assert browser.post("/api/v1/login", json={"name": "alice", "password": PASSWORD}).status_code == 200
        answer = browser.post("/mcp", json=_tools_call("models.list"))
    assert answer.status_code == 403
    row = mcp_rows(server, key=keys["admin"])[0]
    assert row["target"] == "models.list"  # by its address: the session is not taken without its token
    assert row["detail"] == {**row["detail"], "result": "denied", "code": "csrf_failed"}


def test_a_user_key_sees_and_calls_only_what_its_role_may(server: Server, keys: dict[str, str]) -> None:
    user = Actor("alice", "user", "user")
    allowed = [
        name for name, tool in CATALOG.items() if decide(user, tool.action) and name not in TASK_ONLY_TOOLS
    ]
    assert list(listed(server, key=keys["user"])) == allowed
    rest = server.client.get("/api/v1/mcp/tools", headers={"Authorization": f"Bearer {keys['user']}"})
    assert [tool["name"] for tool in rest.json()] == allowed
    denied = refusal(server, "preference.get", {"key": "offline"}, key=keys["user"])
    assert denied.code == -32001
    assert denied.data["code"] == "tool_denied"
    assert "admin role" in denied.message
    row = mcp_rows(server, key=keys["admin"])[0]
    assert (row["actor"], row["target"]) == ("user:alice", "preference.get")
    assert row["detail"] == {**row["detail"], "result": "denied", "code": "tool_denied"}
    assert not call(server, "models.list", key=keys["user"]).isError


def test_an_admin_key_calls_the_admin_tools(server: Server, keys: dict[str, str]) -> None:
    tools = listed(server, key=keys["admin"])
    assert "preference.get" in tools
    got = checked(
        tools["preference.get"], call(server, "preference.get", {"key": "offline"}, key=keys["admin"])
    )
    assert got["value"] is False


def test_the_gateway_switched_off_answers_404_with_a_hint(tmp_path: Path) -> None:
    with module_server(tmp_path / "off", APPLIANCE_MCP__ENABLED="false") as off:
        answer = off.client.post("/mcp", json=_tools_call("preference.get"))
        assert answer.status_code == 404
        assert "mcp.enabled" in answer.json()["hint"]


def test_the_stdio_bridge_carries_a_client_with_a_key_and_says_why_without_one(
    server: Server, keys: dict[str, str]
) -> None:
    async def session(key: str | None) -> list[str] | str:
        env = {**os.environ, **({"APPLIANCE_API_KEY": key} if key else {})}
        command = ["-m", "appliance", "mcp", "stdio", "--url", f"{server.url}/mcp"]
        parameters = StdioServerParameters(command=sys.executable, args=command, env=env)
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as client:
            try:
                await client.initialize()
            except McpError as refused:
                return refused.error.message
            return [tool.name for tool in (await client.list_tools()).tools]

    assert "preference.get" in asyncio.run(session(keys["admin"]))
    refused = asyncio.run(session(None))
    assert isinstance(refused, str)
    assert "API key" in refused
