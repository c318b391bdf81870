"""The MCP gateway with auth off (the loopback default), through the official client: the
catalogue, the answers against their schemas, the refusals as protocol errors, the audit rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import Context
from appliance.errors import ToolNotFound
from appliance.mcp.catalog import CATALOG
from appliance.mcp.types import TASK_ONLY_TOOLS
from appliance.preferences import EDITABLE
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.conftest import Server
from tests.fileserver import serve_files
from tests.mcp.conftest import call, checked, listed, mcp_rows, module_server, refusal
from tests.mcp.examples import EXAMPLES, filled, task_only
from tests.tiny_model import write_llama_gguf
from tests.web.conftest import isolated

LIMIT = 2048  # small enough that the preferences' list is cut
CALLABLE = [name for name in CATALOG if name not in TASK_ONLY_TOOLS]


MODELS = [f"m{number:02}:latest" for number in range(24)]  # more than one answer holds at LIMIT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf_master: Path) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("mcp") / "data"
    with isolated(data_dir.parent):
        runtime = Runtime.open(Settings(data_dir=data_dir))
        try:
            for name in MODELS:  # one blob under many names: quick
                runtime.models.import_file(tiny_gguf_master, Context.cli(), name=name)
        finally:
            runtime.close()
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
    refusal(server, "preference.get", {"key": "offline", "note": "plugh-77"})  # refused, still audited
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
    assert "plugh-77" not in everything  # an argument's value
    assert "models.download.allowed_roles" not in everything  # an argument of an allowed call
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


def test_models_list_pages_and_a_cut_page_goes_on_from_its_last_model(server: Server) -> None:
    tool = listed(server)["models.list"]
    seen: list[str] = []
    arguments: dict[str, Any] = {}
    cut = False
    while True:
        result = call(server, "models.list", arguments)
        page = checked(tool, result)
        assert len(result.content[0].text.encode()) <= LIMIT  # type: ignore[union-attr]
        cut = cut or page["truncated"]
        seen += [model["name"] for model in page["models"]]
        if page["next_cursor"] is None:
            break
        arguments = {"cursor": page["next_cursor"]}
    assert cut
    assert seen == MODELS
    first = checked(tool, call(server, "models.list", {"limit": 1}))["models"][0]
    assert first == {**first, "name": "m00:latest", "formats": ["gguf"], "family": "llama"}


def test_models_show_and_a_missing_model(server: Server) -> None:
    shown = checked(listed(server)["models.show"], call(server, "models.show", {"name": "m01"}))
    assert shown["name"] == "m01:latest"
    assert shown["artifacts"][0]["digest"].startswith("sha256:")
    assert "chat_template" not in shown["capabilities"]
    missing = call(server, "models.show", {"name": "nothing-here"})
    assert missing.isError
    assert missing.content[0].text.startswith("model_not_found:")  # type: ignore[union-attr]


def test_models_pull_waits_for_a_quick_pull_and_answers_a_pending_one_with_its_download(
    server: Server, tmp_path: Path
) -> None:
    tool = listed(server)["models.pull"]
    content = write_llama_gguf(tmp_path / "served.gguf", seed=7).read_bytes()
    with serve_files() as files:
        url = files.add("/models/pulled.gguf", content)
        done = checked(tool, call(server, "models.pull", {"ref": url, "wait_seconds": 30}))
        assert done["state"] == "done"
        assert done["name"] == "pulled:latest"
        assert done["downloaded"] is True
        approval = server.client.put(
            "/api/v1/preferences/models.download.require_user_approval", json={"value": True}
        )
        assert approval.status_code == 200
        try:
            other = files.add("/models/waiting.gguf", content)
            pending = checked(tool, call(server, "models.pull", {"ref": other, "wait_seconds": 0.5}))
            assert pending["state"] == "pending"
            assert f"appliance downloads approve {pending['download_id']}" in pending["note"]
            denied = server.client.post(f"/api/v1/downloads/{pending['download_id']}/deny")
            assert denied.status_code == 200
        finally:
            server.client.put(
                "/api/v1/preferences/models.download.require_user_approval", json={"value": None}
            )


def test_every_tool_a_caller_that_is_no_job_may_call_answers_once(server: Server, tmp_path: Path) -> None:
    assert sorted(EXAMPLES) == sorted(CATALOG)  # the table covers the catalogue
    tools = listed(server)
    made = {"file": str(write_llama_gguf(tmp_path / "pulled.gguf", seed=11)), "task": ""}
    for name in task_only(False):
        answer = checked(tools[name], call(server, name, filled(EXAMPLES[name], **made)))
        if name == "tasks.create":
            made["task"] = answer["id"]
    rows = mcp_rows(server)[: len(task_only(False))]
    assert [row["target"] for row in reversed(rows)] == task_only(False)
    assert {row["detail"]["result"] for row in rows} == {"ok"}
