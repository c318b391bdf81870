"""The tasks tools: create, get and output through the task service with the caller's own context
(who owns what, the tool grants), and output read in parts that fit."""

from __future__ import annotations

import pytest

from appliance.errors import Forbidden, InvalidInput, ModelNotFound, TaskNotFound
from appliance.identity import Actor
from appliance.runtime import Runtime
from tests.mcp.direct import job_scope, run_tool

ALICE = Actor(id="alice", kind="user", role="user")
BOB = Actor(id="bob", kind="user", role="user")
ROOT = Actor(id="root", kind="user", role="admin")


def test_a_user_creates_a_task_and_reads_it_back_others_do_not_see_it(runtime: Runtime) -> None:
    made = run_tool(
        runtime,
        "tasks.create",
        {
            "mode": "commands",
            "text": "echo hi",
            "tools": ["preference.get", "chat"],
            "limits": {"cpu_seconds": 5},
        },
        who=ALICE,
    )
    assert (made.mode, made.state, made.finished, made.actor) == ("commands", "queued", False, "user:alice")
    assert made.tools == ["chat", "preference.get"]
    assert made.limits["cpu_seconds"] == 5
    assert runtime.store.get_task(made.id) is not None

    shown = run_tool(runtime, "tasks.get", {"task_id": made.id}, who=ALICE)
    assert shown == made
    assert run_tool(runtime, "tasks.get", {"task_id": made.id}, who=ROOT).id == made.id
    with pytest.raises(TaskNotFound, match=f"task {made.id} not found"):
        run_tool(runtime, "tasks.get", {"task_id": made.id}, who=BOB)
    with pytest.raises(TaskNotFound):
        run_tool(runtime, "tasks.output", {"task_id": made.id}, who=BOB)
    with pytest.raises(TaskNotFound):
        run_tool(runtime, "tasks.get", {"task_id": "nope"}, who=ALICE)


def test_the_services_rules_refuse_a_task(runtime: Runtime) -> None:
    with pytest.raises(InvalidInput, match="a prompt task runs no job to call them"):
        run_tool(runtime, "tasks.create", {"text": "hi", "model": "tiny", "tools": ["chat"]}, who=ALICE)
    with pytest.raises(InvalidInput, match=r"no MCP tool is named 'rm\.rf'"):
        run_tool(runtime, "tasks.create", {"mode": "script", "text": "true", "tools": ["rm.rf"]}, who=ALICE)
    with pytest.raises(InvalidInput, match="is not a task limit"):
        run_tool(
            runtime, "tasks.create", {"mode": "script", "text": "true", "limits": {"gpus": 1}}, who=ALICE
        )
    with pytest.raises(ModelNotFound):
        run_tool(runtime, "tasks.create", {"text": "hi", "model": "ghost"}, who=ALICE)


def test_a_jobs_task_grants_only_the_tools_its_own_task_has(runtime: Runtime) -> None:
    parent = run_tool(
        runtime,
        "tasks.create",
        {"mode": "commands", "text": "true", "tools": ["tasks.create", "chat"]},
        who=ALICE,
    )
    scope = job_scope(parent.id)
    child = run_tool(
        runtime, "tasks.create", {"mode": "commands", "text": "true", "tools": ["chat"]}, scope=scope
    )
    assert (child.actor, child.tools) == (f"task:{parent.id}", ["chat"])
    # The job sees the task it made, not its own creator's others.
    assert run_tool(runtime, "tasks.get", {"task_id": child.id}, scope=scope).id == child.id
    with pytest.raises(TaskNotFound):
        run_tool(runtime, "tasks.get", {"task_id": parent.id}, scope=scope)
    with pytest.raises(Forbidden, match=r"may not grant models\.pull"):
        run_tool(
            runtime,
            "tasks.create",
            {"mode": "commands", "text": "true", "tools": ["models.pull"]},
            scope=scope,
        )


def test_output_is_read_from_an_offset_in_parts_that_fit(runtime: Runtime) -> None:
    made = run_tool(runtime, "tasks.create", {"mode": "commands", "text": "true"}, who=ALICE)
    empty = run_tool(runtime, "tasks.output", {"task_id": made.id}, who=ALICE)
    assert (empty.text, empty.offset, empty.next_offset, empty.size, empty.finished) == ("", 0, 0, 0, False)

    # What the job printed, as the queue writes it (the sandboxed run has its own tests).
    printed = 'line é 😀 "quoted"\n' * 400
    task_dir = runtime.tasks.task_dir(made.id)
    (task_dir / "stdout").write_text(printed)
    (task_dir / "stderr").write_text("warning\n")
    assert (
        run_tool(runtime, "tasks.output", {"task_id": made.id, "stream": "stderr"}, who=ALICE).text
        == "warning\n"
    )

    read, offset = "", 0
    while True:
        part = run_tool(
            runtime, "tasks.output", {"task_id": made.id, "offset": offset}, who=ALICE, limit=1024
        )
        read += part.text
        assert part.next_offset == len(read.encode())
        assert part.truncated == (part.next_offset < part.size)
        offset = part.next_offset
        if offset == part.size:
            break
    assert read == printed

    # An offset inside a character starts at the next one.
    inside = printed.encode().index("é".encode()) + 1
    part = run_tool(runtime, "tasks.output", {"task_id": made.id, "offset": inside}, who=ALICE)
    assert (part.offset, part.text[:2]) == (inside + 1, " 😀")
    size = len(printed.encode())
    with pytest.raises(InvalidInput, match=f"offset {size + 1} is past the end of the task's stdout") as e:
        run_tool(runtime, "tasks.output", {"task_id": made.id, "offset": size + 1}, who=ALICE)
    assert e.value.hint == "ask from the next_offset of the last answer, or from 0"


def test_a_long_task_text_is_cut_to_fit(runtime: Runtime) -> None:
    script = "echo 'ü'\n" * 500
    made = run_tool(runtime, "tasks.create", {"mode": "script", "text": script}, who=ALICE, limit=1024)
    assert made.truncated
    assert script.startswith(made.text)
    assert runtime.store.get_task(made.id).text == script  # type: ignore[union-attr]
