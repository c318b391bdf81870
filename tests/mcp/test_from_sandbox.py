"""The MCP gateway from inside a task's sandbox: a real server, real bubblewrap, the job's own
forwarder, and JSON-RPC by hand with the system's python3 (a job has no SDK): the tools a task
was granted and no other, its ids held to its own, and a task granted nothing with no way to /mcp."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import isolated
from tests.web.serving import Serving, serving

# Each call prints one JSON line: {"name": ..., "result": ...} or {"name": ..., "error": ...}.
CALLS = r"""
import json, os, urllib.request
ids = {"task_id": os.environ["TASK_ID"], "run_id": os.environ["RUN_ID"], "job_id": os.environ["JOB_ID"]}

def rpc(label, method, params):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(os.environ["MCP_URL"], data=body, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Mcp-Protocol-Version": "2025-06-18"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    print(json.dumps({"name": label, **{k: answer[k] for k in ("result", "error") if k in answer}}))

def call(label, tool, arguments, meta):
    rpc(label, "tools/call", {"name": tool, "arguments": arguments, "_meta": meta})

names = ("MCP_URL", "RUN_ID", "INFERENCE_URL", "OLLAMA_BASE_URL")
print(json.dumps({"name": "env", "result": {name: os.environ.get(name) for name in names}}))
rpc("list", "tools/list", {"_meta": ids})
call("get", "preference.get", {"key": "models.download.allowed_roles"}, ids)
call("pull", "models.pull", {"name": "tiny"}, ids)
call("wrong job", "preference.get", {"key": "offline"}, {**ids, "job_id": "0" * 16})
call("no ids", "preference.get", {"key": "offline"}, {})
"""

# A job of a task granted nothing, and one given inference alone.
UNGRANTED = (
    'echo "[$MCP_URL][$RUN_ID][$JOB_ID]"\n'
    'curl -s -o /dev/null -w "%{http_code}\\n" -X POST http://127.0.0.1:11434/mcp -d "{}" || true'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    """One server for the module, its data dir where a job's user may pass (as root, nobody)."""
    shared = Path(tempfile.mkdtemp(prefix="appliance-mcp-"))
    shared.chmod(0o711)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, True)
        with isolated(tmp_path_factory.mktemp("home")):
            started = stack.enter_context(serving(shared / "data"))
        yield started


def run(server: Serving, **fields: Any) -> dict[str, Any]:
    """Create the task, wait for its end; the task as it ended, with its stdout and stderr."""
    created = server.client.post("/api/v1/tasks", **fields)
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    with server.client.stream("GET", f"/api/v1/tasks/{task_id}/events", timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("event: end"):
                break
    ended: dict[str, Any] = server.client.get(f"/api/v1/tasks/{task_id}").json()
    ended.update(server.client.get(f"/api/v1/tasks/{task_id}/output").json())
    return ended


def audit(server: Serving, action: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = server.client.get(
        "/api/v1/audit", params={"action": action, "limit": 1000}
    ).json()
    return rows


def test_a_job_calls_the_tool_it_was_granted_and_no_other(server: Serving) -> None:
    roles = server.client.put(
        "/api/v1/preferences/models.download.allowed_roles", json={"value": ["admin", "user"]}
    )
    assert roles.status_code == 200, roles.text
    ended = run(
        server,
        data={"mode": "commands", "text": "python3 /work/calls.py", "tools": "preference.get"},
        files=[("attachment", ("calls.py", CALLS.encode()))],
    )
    assert (ended["state"], ended["tools"], ended["inference"]) == ("succeeded", ["preference.get"], False), (
        ended
    )
    answers = {line["name"]: line for line in map(json.loads, ended["stdout"].splitlines())}
    # Granted tools, not inference: the gateway's URL and its ids, no model's.
    assert answers["env"]["result"] == {
        "MCP_URL": "http://127.0.0.1:11434/mcp",
        "RUN_ID": "1",
        "INFERENCE_URL": None,
        "OLLAMA_BASE_URL": None,
    }
    # Its tools/list shows only what it was granted; preference.get answers the value in effect.
    assert [tool["name"] for tool in answers["list"]["result"]["tools"]] == ["preference.get"]
    got = answers["get"]["result"]
    assert got.get("isError") is not True, got
    assert got["structuredContent"]["value"] == ["admin", "user"]
    assert json.loads(got["content"][0]["text"]) == got["structuredContent"]
    # models.pull was not granted; a wrong job id and missing ids are refused before any tool runs.
    for name, code in (
        ("pull", "tool_not_granted"),
        ("wrong job", "mcp_scope_mismatch"),
        ("no ids", "mcp_scope_missing"),
    ):
        error = answers[name]["error"]
        assert (error["code"], error["data"]["code"]) == (-32001, code), (name, error)
        assert error["data"]["hint"], error
    # Each call is audited as the task with its ids (the denials too); the forwarder adds no row.
    task_id = ended["id"]
    rows = [row for row in audit(server, "mcp.call") if row["correlation_id"] == task_id]
    assert sorted((row["target"], row["detail"]["result"], row["detail"].get("code")) for row in rows) == [
        ("models.pull", "denied", "tool_not_granted"),
        ("preference.get", "denied", "mcp_scope_mismatch"),
        ("preference.get", "denied", "mcp_scope_missing"),
        ("preference.get", "ok", None),
    ]
    assert {row["actor"] for row in rows} == {f"task:{task_id}"}
    assert {(row["detail"]["task_id"], row["detail"]["run_id"]) for row in rows} == {(task_id, "1")}
    assert len({row["detail"]["job_id"] for row in rows}) == 1
    assert [row for row in audit(server, "task.inference") if row["target"] == task_id] == []


def test_a_task_granted_nothing_has_no_mcp_url_and_no_way_to_it(server: Serving) -> None:
    bare = run(server, json={"mode": "commands", "text": UNGRANTED})
    assert (bare["state"], bare["tools"]) == ("succeeded", []), bare
    assert bare["stdout"] == "[][][]\n000\n"  # nothing listens on its loopback
    with_inference = run(server, json={"mode": "commands", "text": UNGRANTED, "inference": True})
    assert with_inference["stdout"] == "[][][]\n403\n"  # its forwarder refuses /mcp
    (refused,) = [row for row in audit(server, "task.inference") if row["target"] == with_inference["id"]]
    assert (refused["outcome"], refused["detail"]["route"], refused["detail"]["status"]) == (
        "error",
        "POST /mcp",
        403,
    )
