"""The gateway's rules, called in this process on a real runtime and store: a job's scope and
grants, the task-only tools, policy with auth on, answers too large, and the audit row each writes.
(The same rules over HTTP, with the official client: test_gateway*.py; from a sandboxed job:
test_from_sandbox.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import types
from mcp.shared.exceptions import McpError

from appliance.audit import Context
from appliance.identity import Actor, TaskScope
from appliance.mcp.catalog import CATALOG
from appliance.mcp.limits import fit_text
from appliance.mcp.server import Caller, Gateway
from appliance.mcp.types import Tool, ToolCall, ToolInput, ToolOutput
from appliance.preferences import ALLOWED_ROLES
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import Task
from appliance.tasks.records import TOOLS_OPTION
from tests.mcp.examples import EXAMPLES, task_only

SCOPE = TaskScope(task_id="t-mcp-1", run_id="1", job_id="0123456789abcdef")
JOB = Caller(actor=Actor(id=SCOPE.task_id, kind="task", role="user"), scope=SCOPE, correlation_id="r1")
ADMIN = Caller(actor=Actor(id="root", kind="user", role="admin"), scope=None, correlation_id="r2")
USER = Caller(actor=Actor(id="alice", kind="user", role="user"), scope=None, correlation_id="r3")


class NoArguments(ToolInput):
    pass


class Text(ToolOutput):
    text: str


def _text(size: int) -> Any:
    async def run(call: ToolCall, given: NoArguments) -> Text:
        return Text(text="é" * size)

    return run


# Test tools under catalogue names (a tool's action comes from its name): a job's own tool, and
# one answer too large to send whole, with and without a way to cut it.
OWN = Tool(name="artifacts.list", title="t", description="d", input=NoArguments, output=Text, run=_text(1))
HUGE = Tool(name="tasks.output", title="t", description="d", input=NoArguments, output=Text, run=_text(5000))
CUT = Tool(
    name="tasks.get",
    title="t",
    description="d",
    input=NoArguments,
    output=Text,
    run=_text(5000),
    fit=lambda output, limit: fit_text(output, "text", limit),
)


@pytest.fixture
def runtime(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setenv("APPLIANCE_SERVER__AUTH", "on")
    monkeypatch.setenv("APPLIANCE_MCP__MAX_RESULT_BYTES", "2048")
    opened = Runtime.open(Settings(data_dir=data_dir))
    opened.store.create_task(
        Task(
            id=SCOPE.task_id,
            mode="commands",
            text="true",
            model=None,
            state="running",
            actor="user:alice",
            limits={TOOLS_OPTION: ["artifacts.list", "artifacts.read", "artifacts.write", "preference.get"]},
            attempts=1,
        )
    )
    (opened.tasks.task_dir(SCOPE.task_id) / "work").mkdir(parents=True)  # the job's /work
    yield opened
    opened.close()


@pytest.fixture
def gateway(runtime: Runtime) -> Gateway:
    catalog = {**CATALOG, OWN.name: OWN, HUGE.name: HUGE, CUT.name: CUT}
    return Gateway(runtime, catalog=catalog)


def _call(
    gateway: Gateway, caller: Caller, name: str, arguments: dict[str, Any] | None = None, **meta: Any
) -> types.CallToolResult:
    params = types.CallToolRequestParams(
        name=name, arguments=arguments or {}, _meta=types.RequestParams.Meta(**meta) if meta else None
    )
    return asyncio.run(gateway.call(caller, types.CallToolRequest(params=params)))


def _refused(gateway: Gateway, caller: Caller, name: str, **meta: Any) -> str:
    with pytest.raises(McpError) as refused:
        _call(gateway, caller, name, {"key": "offline"} if name.startswith("preference") else {}, **meta)
    assert refused.value.error.code == -32001
    data = refused.value.error.data
    assert data["hint"]
    code: str = data["code"]
    return code


def _last_row(runtime: Runtime) -> Any:
    return runtime.store.list_audit(action="mcp.call", limit=1)[0]


def _ids() -> dict[str, str]:
    return {"task_id": SCOPE.task_id, "run_id": SCOPE.run_id, "job_id": SCOPE.job_id}


def test_a_job_calls_a_granted_tool_with_its_own_ids_and_the_row_names_them(
    gateway: Gateway, runtime: Runtime
) -> None:
    result = _call(gateway, JOB, "preference.get", {"key": "offline"}, **_ids())
    assert not result.isError
    assert result.structuredContent is not None
    assert result.structuredContent["value"] is False
    row = _last_row(runtime)
    assert (row.actor, row.target, row.outcome) == (f"task:{SCOPE.task_id}", "preference.get", "ok")
    assert row.correlation_id == SCOPE.task_id
    assert row.detail == {**row.detail, **_ids(), "result": "ok"}


@pytest.mark.parametrize(
    ("meta", "code"),
    [
        ({}, "mcp_scope_missing"),
        ({"task_id": SCOPE.task_id, "run_id": "1"}, "mcp_scope_missing"),
        ({"task_id": SCOPE.task_id, "run_id": "2", "job_id": SCOPE.job_id}, "mcp_scope_mismatch"),
        ({"task_id": "another", "run_id": "1", "job_id": SCOPE.job_id}, "mcp_scope_mismatch"),
        ({"task_id": SCOPE.task_id, "run_id": "1", "job_id": "feedfeedfeedfeed"}, "mcp_scope_mismatch"),
    ],
)
def test_a_job_call_without_its_own_ids_is_refused_before_the_tool_runs_and_audited(
    gateway: Gateway, runtime: Runtime, meta: dict[str, str], code: str
) -> None:
    assert _refused(gateway, JOB, "preference.get", **meta) == code
    row = _last_row(runtime)
    assert row.detail == {**row.detail, "result": "denied", "code": code, **_ids()}
    assert row.outcome == "error"


def test_a_job_sees_and_calls_only_its_granted_tools(gateway: Gateway, runtime: Runtime) -> None:
    assert [tool.name for tool in gateway.visible(JOB)] == [
        "preference.get",
        "artifacts.list",
        "artifacts.read",
        "artifacts.write",
    ]
    assert _refused(gateway, JOB, "models.pull", **_ids()) == "tool_not_granted"
    assert _refused(gateway, JOB, "preference.list", **_ids()) == "tool_not_granted"
    assert not _call(gateway, JOB, "artifacts.list", **_ids()).isError


def test_a_task_only_tool_is_refused_to_anyone_but_a_job(gateway: Gateway) -> None:
    assert _refused(gateway, ADMIN, "artifacts.list") == "tool_task_only"
    assert "artifacts.list" not in [tool.name for tool in gateway.visible(ADMIN)]


def test_with_auth_on_each_tool_needs_its_action(gateway: Gateway, runtime: Runtime) -> None:
    assert _refused(gateway, USER, "preference.get") == "tool_denied"
    row = _last_row(runtime)
    assert row.actor == "user:alice"
    assert "preferences.read" in row.detail["reason"]
    visible = [tool.name for tool in gateway.visible(USER)]
    assert "models.list" in visible
    assert "preference.get" not in visible
    assert "models.pull" not in visible
    assert _refused(gateway, USER, "models.pull") == "tool_denied"
    runtime.preferences.set(ALLOWED_ROLES.name, ["user"], Context.cli())  # the site lets users pull
    assert "models.pull" in [tool.name for tool in gateway.visible(USER)]


def test_a_non_job_sending_job_ids_is_refused(gateway: Gateway) -> None:
    assert _refused(gateway, ADMIN, "preference.get", task_id=SCOPE.task_id) == "mcp_scope_mismatch"


def test_an_answer_too_large_is_cut_by_its_tool_or_refused_as_an_error(
    gateway: Gateway, runtime: Runtime
) -> None:
    cut = _call(gateway, ADMIN, "tasks.get")
    assert cut.structuredContent is not None
    assert cut.structuredContent["truncated"] is True
    assert len(cut.content[0].text.encode()) <= 2048  # type: ignore[union-attr]
    assert set(cut.structuredContent["text"]) == {"é"}  # cut between characters, never inside one
    huge = _call(gateway, ADMIN, "tasks.output")
    assert huge.isError
    assert huge.content[0].text.startswith("result_too_large:")  # type: ignore[union-attr]
    row = _last_row(runtime)
    assert row.detail == {**row.detail, "result": "failed", "code": "result_too_large"}


def test_every_tool_only_a_job_may_call_answers_its_job_once(runtime: Runtime) -> None:
    gateway = Gateway(runtime)  # the real catalogue
    for name in task_only(True):
        result = _call(gateway, JOB, name, EXAMPLES[name], **_ids())
        assert not result.isError, result.content
        assert result.structuredContent is not None
        jsonschema.validate(result.structuredContent, CATALOG[name].schemas()[1])
    assert result.structuredContent["entries"][0]["path"] == "out/a.txt"
