"""The MCP gateway with auth off (the loopback default), through the official client: the
catalogue, the answers against their schemas, the refusals as protocol errors, the audit rows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.errors import ToolNotFound
from appliance.mcp.catalog import CATALOG
from appliance.mcp.types import TASK_ONLY_TOOLS
from appliance.preferences import EDITABLE
from tests.conftest import Server
from tests.mcp.conftest import call, checked, listed, mcp_rows, module_server, refusal

LIMIT = 2048  # small enough that the preferences' list is cut
CALLABLE = [name for name in CATALOG if name not in TASK_ONLY_TOOLS]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("mcp") / "data"
    with module_server(data_dir, APPLIANCE_MCP__MAX_RESULT_BYTES=str(LIMIT)) as started:
        yield started


def test_the_client_lists_the_catalogue_with_schemas(server: Server) -> None:
    tools = listed(server)
    assert list(tools) == CALLABLE  # with auth off a caller that is no job may call all but task-only
    get = tools["preference.get"]
    assert get.inputSchema["properties"]["key"]["enum"] == list(EDITABLE)
    assert get.outputSchema is not None
    assert "truncated" in get.outputSchema["properties"]


def test_the_preference_tools_answer_typed_values(server: Server) -> None:
    tools = listed(server)
    got = checked(tools["preference.get"], call(server, "preference.get", {"key": "offline"}))
    assert got == {**got, "key": "offline", "value": False, "overridden": False, "truncated": False}
    assert got["value_schema"] == {"type": "boolean"}
    effective = checked(
        tools["preference.effective"], call(server, "preference.effective", {"key": "engine.context_length"})
    )
    assert effective["source"] == "setting"
    assert isinstance(effective["value"], int)


def test_a_long_answer_is_cut_to_whole_items_with_the_flag(server: Server) -> None:
    tool = listed(server)["preference.list"]
    result = call(server, "preference.list")
    answer = checked(tool, result)
    assert answer["truncated"] is True
    assert 0 < len(answer["preferences"]) < len(EDITABLE)
    assert len(result.content[0].text.encode()) <= LIMIT  # type: ignore[union-attr]


def test_an_unknown_key_is_a_failed_call_naming_the_known_ones(server: Server) -> None:
    result = call(server, "preference.get", {"key": "no.such.key"})
    assert result.isError
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith("invalid_setting:")
    assert "models.cache.max_bytes" in text
    row = mcp_rows(server)[0]
    assert row["target"] == "preference.get"
    assert row["outcome"] == "error"
    assert row["detail"]["result"] == "failed"
    assert row["detail"]["code"] == "invalid_setting"


def test_refusals_are_protocol_errors_with_a_code_and_a_hint_and_are_audited(server: Server) -> None:
    unknown = refusal(server, "no.such.tool")
    assert unknown.code == -32602
    assert unknown.data["code"] == ToolNotFound.code
    assert unknown.data["hint"]
    bad = refusal(server, "preference.get", {"key": "offline", "secret-argument": "xyzzy-42"})
    assert bad.code == -32602
    assert bad.data["code"] == "invalid_input"
    assert "secret-argument" in bad.message
    assert "xyzzy-42" not in bad.message
    ids = refusal(server, "preference.get", {"key": "offline"}, meta={"task_id": "t1"})
    assert ids.code == -32001
    assert ids.data["code"] == "mcp_scope_mismatch"
    rows = mcp_rows(server)
    assert [(row["target"], row["detail"]["result"], row["detail"]["code"]) for row in rows[:3]] == [
        ("preference.get", "denied", "mcp_scope_mismatch"),
        ("preference.get", "denied", "invalid_input"),
        ("no.such.tool", "denied", "tool_not_found"),
    ]
    assert all(row["outcome"] == "error" for row in rows[:3])


def test_audit_rows_carry_sizes_and_never_arguments_or_results(server: Server) -> None:
    call(server, "preference.get", {"key": "models.download.allowed_roles"}, meta={"progressToken": 1})
    row = mcp_rows(server)[0]
    assert (row["action"], row["outcome"], row["actor"]) == ("mcp.call", "ok", "api:127.0.0.1")
    detail = row["detail"]
    assert detail["result"] == "ok"
    assert detail["truncated"] is False
    assert detail["request_bytes"] > 0
    assert detail["response_bytes"] == row["bytes"] > 0
    assert row["duration_ms"] is not None
    everything = server.client.get("/api/v1/audit", params={"limit": 1000}).text
    assert "xyzzy-42" not in everything  # the argument value the previous test sent
    assert "Roles that may pull" not in everything  # a result's text


def test_the_rest_surface_and_the_metrics(server: Server) -> None:
    tools = server.client.get("/api/v1/mcp/tools").json()
    assert [tool["name"] for tool in tools] == CALLABLE
    first = tools[0]
    assert first["action"] == "preferences.read"
    assert first["task_only"] is False
    assert first["input_schema"]["type"] == "object"
    metrics = server.client.get("/metrics").text
    assert 'appliance_mcp_calls_total{outcome="ok",tool="preference.get"}' in metrics
    assert "appliance_mcp_call_seconds_bucket" in metrics
