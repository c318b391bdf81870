"""The inference, tasks and artifacts tools end to end: the official client against a real server
(the tiny model, auth off) with answers valid against their schemas, and a sandboxed job that
writes and reads its own work directory through ``MCP_URL``."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, import_file
from tests.mcp.conftest import call, checked, listed, mcp_rows, module_server, refusal
from tests.web.conftest import isolated


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf_master: Path) -> Iterator[Server]:
    """One server for the module, its data dir where a job's user may pass (as root, nobody)."""
    shared = Path(tempfile.mkdtemp(prefix="appliance-mcp-tools-"))
    shared.chmod(0o711)
    data_dir = shared / "data"
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, True)
        with isolated(tmp_path_factory.mktemp("home")):
            import_file(data_dir, tiny_gguf_master, "tiny")
        yield stack.enter_context(module_server(data_dir))


def ended(server: Server, tools: dict[str, Any], task_id: str) -> dict[str, Any]:
    """``tasks.get`` until the task has ended."""
    deadline = time.monotonic() + 60
    while True:
        task = checked(tools["tasks.get"], call(server, "tasks.get", {"task_id": task_id}))
        if task["finished"] or time.monotonic() > deadline:
            return task
        time.sleep(0.2)


def test_chat_embed_and_a_task_through_the_official_client(server: Server) -> None:
    tools = listed(server)
    assert {"chat", "embed", "tasks.create", "tasks.get", "tasks.output"} <= set(tools)
    assert not {"artifacts.list", "artifacts.read", "artifacts.write"} & set(tools)  # no job: not its tools

    messages = [{"role": "user", "content": "Hi"}]
    chat = checked(
        tools["chat"], call(server, "chat", {"model": "tiny", "messages": messages, "max_tokens": 4})
    )
    assert (chat["model"], chat["finish_reason"], chat["usage"]["completion_tokens"]) == (
        "tiny:latest",
        "length",
        4,
    )
    assert chat["served_by"]["node"] == "local"
    embedded = checked(tools["embed"], call(server, "embed", {"model": "tiny", "input": ["a", "b"]}))
    assert [len(vector) for vector in embedded["vectors"]] == [64, 64]

    made = checked(
        tools["tasks.create"],
        call(
            server,
            "tasks.create",
            {"mode": "commands", "text": "echo out\necho err >&2\nprintf 'é%.0s' $(seq 3)"},
        ),
    )
    task = ended(server, tools, made["id"])
    assert (task["state"], task["result"]["exit_code"]) == ("succeeded", 0), task
    out = checked(tools["tasks.output"], call(server, "tasks.output", {"task_id": made["id"]}))
    assert (out["text"], out["next_offset"], out["size"], out["finished"]) == ("out\néé\u00e9", 10, 10, True)
    err = checked(
        tools["tasks.output"], call(server, "tasks.output", {"task_id": made["id"], "stream": "stderr"})
    )
    assert err["text"] == "err\n"

    # A tool that runs and fails answers an error result naming the code; nothing is refused.
    failed = call(server, "chat", {"model": "ghost", "messages": messages})
    assert failed.isError
    assert failed.content[0].text.startswith("model_not_found:")  # type: ignore[union-attr]
    missing = call(server, "tasks.get", {"task_id": "nope"})
    assert missing.isError
    assert missing.content[0].text.startswith("task_not_found:")  # type: ignore[union-attr]
    # The artifacts tools are a job's own: a caller that is none is refused before they run.
    refused = refusal(server, "artifacts.read", {"path": "x"})
    assert (refused.code, refused.data["code"]) == (-32001, "tool_task_only")
    rows = mcp_rows(server)
    assert [(row["target"], row["detail"]["result"]) for row in rows[:3]] == [
        ("artifacts.read", "denied"),
        ("tasks.get", "failed"),
        ("chat", "failed"),
    ]


# A job's calls by hand (a job has no SDK), one JSON line each: {"name": ..., "result"|"error": ...}.
CALLS = r"""
import json, os, urllib.request
ids = {"task_id": os.environ["TASK_ID"], "run_id": os.environ["RUN_ID"], "job_id": os.environ["JOB_ID"]}

def call(label, tool, arguments):
    params = {"name": tool, "arguments": arguments, "_meta": ids}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).encode()
    request = urllib.request.Request(os.environ["MCP_URL"], data=body, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Mcp-Protocol-Version": "2025-06-18"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    print(json.dumps({"name": label, **{k: answer[k] for k in ("result", "error") if k in answer}}))

call("write", "artifacts.write", {"path": "out/report.txt", "content": "written through MCP\n"})
call("read", "artifacts.read", {"path": "out/report.txt"})
call("list", "artifacts.list", {"path": "out"})
call("escape", "artifacts.read", {"path": "../stdout"})
call("tasks", "tasks.get", {"task_id": ids["task_id"]})
"""


def test_a_job_writes_and_reads_its_own_work_directory_through_mcp(server: Server) -> None:
    tools = listed(server)
    made = checked(
        tools["tasks.create"],
        call(
            server,
            "tasks.create",
            {
                "mode": "script",
                "text": f"cat > calls.py <<'EOF'\n{CALLS}\nEOF\npython3 calls.py\ncat out/report.txt",
                "tools": ["artifacts.write", "artifacts.read", "artifacts.list"],
            },
        ),
    )
    task = ended(server, tools, made["id"])
    out = checked(tools["tasks.output"], call(server, "tasks.output", {"task_id": made["id"]}))["text"]
    assert task["state"] == "succeeded", (task, out)
    *lines, last = out.splitlines()
    assert last == "written through MCP"  # the job's own /work holds what it wrote through the gateway
    answers = {line["name"]: line for line in map(json.loads, lines)}
    assert answers["write"]["result"]["structuredContent"] == {
        "path": "out/report.txt",
        "written": 20,
        "size": 20,
        "truncated": False,
    }
    assert answers["read"]["result"]["structuredContent"]["content"] == "written through MCP\n"
    assert [entry["path"] for entry in answers["list"]["result"]["structuredContent"]["entries"]] == [
        "out/report.txt"
    ]
    escape = answers["escape"]["result"]
    assert escape["isError"] is True
    assert escape["content"][0]["text"].startswith("invalid_input: the path '../stdout' climbs out")
    assert answers["tasks"]["error"]["data"]["code"] == "tool_not_granted"
