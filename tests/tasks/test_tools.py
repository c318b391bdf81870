"""Granting a task MCP tools, on a real store: what may be granted, by whom, where it is kept, and
what a worker's claim and its forwarded calls get. Jobs calling the tools: tests/mcp/test_from_sandbox.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditService, Context
from appliance.errors import Forbidden, InvalidInput
from appliance.identity import Actor
from appliance.mcp.types import TOOL_NAMES
from appliance.preferences import ALLOWED_ROLES
from appliance.runtime import Runtime
from appliance.settings import ServerSettings, Settings
from appliance.tasks.forwarder import MCP_URL, JobAccess, task_actor
from appliance.tasks.records import TOOLS_OPTION, TaskOut, job_limits
from appliance.tasks.service import NewTask, TaskService

ANN = Context(Actor(id="ann", kind="user", role="user"))
ADMIN = Context(Actor(id="root", kind="user", role="admin"))
SCRIPT = {"mode": "script", "text": "true"}
SANDBOX = {"sandbox": {"available": True}}


def open_service(data_dir: Path, *, auth: bool) -> Iterator[TaskService]:
    runtime = Runtime.open(Settings(data_dir=data_dir, server=ServerSettings(auth="on" if auth else "auto")))
    yield runtime.tasks  # its queue is never started: tasks stay queued
    runtime.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TaskService]:
    yield from open_service(tmp_path / "data", auth=False)


@pytest.fixture
def with_auth(tmp_path: Path) -> Iterator[TaskService]:
    yield from open_service(tmp_path / "data", auth=True)


def create(service: TaskService, context: Context = ADMIN, **fields: object) -> TaskOut:
    task, _ = service.create(NewTask.model_validate({**SCRIPT, **fields}), [], context)
    return TaskOut.of(task)


def test_granted_tools_are_kept_sorted_beside_the_limits_and_shown(service: TaskService) -> None:
    task = create(service, tools=["tasks.get", "preference.get", "tasks.get"])
    assert task.tools == ["preference.get", "tasks.get"]
    assert TOOLS_OPTION not in task.limits  # a grant, not a job limit
    stored = service.store.get_task(task.id)
    assert stored is not None
    assert stored.limits[TOOLS_OPTION] == ["preference.get", "tasks.get"]
    assert TOOLS_OPTION not in job_limits(stored)
    assert create(service).tools == []


def test_the_same_idempotency_key_gives_back_the_same_granted_task(service: TaskService) -> None:
    first, added = service.create(NewTask(**SCRIPT, tools=["tasks.get"], idempotency_key="k"), [], ANN)
    again, added_again = service.create(NewTask(**SCRIPT, tools=["tasks.get"], idempotency_key="k"), [], ANN)
    assert (added, added_again, again.id) == (True, False, first.id)
    assert TaskOut.of(again).tools == ["tasks.get"]


@pytest.mark.parametrize(
    ("fields", "message", "hint"),
    [
        (
            {"mode": "prompt", "model": "tiny", "tools": ["preference.get"]},
            "tools are for script and commands tasks",
            "leave tools out of a prompt task",
        ),
        ({"tools": ["preference.get", "shell", "rm"]}, "no MCP tool is named 'rm', 'shell'", TOOL_NAMES[0]),
    ],
)
def test_a_grant_that_cannot_be_is_refused_and_nothing_is_stored(
    service: TaskService, fields: dict[str, object], message: str, hint: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as refused:
        create(service, **fields)
    assert hint in (refused.value.hint or "")
    assert service.store.list_tasks() == []
    assert not service.root.exists() or list(service.root.iterdir()) == []


def test_with_auth_on_a_creator_grants_only_tools_it_may_call(with_auth: TaskService) -> None:
    # A user may read tasks but not preferences (an admin's), nor pull (unless the site lets users).
    assert create(with_auth, ANN, tools=["tasks.get", "chat"]).tools == ["chat", "tasks.get"]
    for tool in ("preference.get", "models.pull"):
        with pytest.raises(Forbidden, match=f"user:ann may not grant the tool {tool}") as refused:
            create(with_auth, ANN, tools=["tasks.get", tool])
        assert "grant only tools you may call yourself" in (refused.value.hint or "")
    assert len(with_auth.store.list_tasks()) == 1
    assert create(with_auth, ADMIN, tools=list(TOOL_NAMES)).tools == sorted(TOOL_NAMES)
    # The site's pull roles count for a grant of models.pull as for a pull.
    with_auth.store.set_preference(ALLOWED_ROLES.name, ["admin", "user"], actor="cli")
    assert create(with_auth, ANN, tools=["models.pull"]).tools == ["models.pull"]


def test_with_auth_on_a_tasks_job_passes_on_what_an_admin_granted_it(with_auth: TaskService) -> None:
    parent = create(with_auth, ADMIN, tools=["preference.get", "tasks.create"])
    child = create(with_auth, Context(task_actor(parent.id)), tools=["preference.get"])
    assert child.tools == ["preference.get"]  # a user's role could not grant it; the admin's grant holds


def test_a_tasks_job_grants_only_the_tools_it_holds(service: TaskService) -> None:
    parent = create(service, tools=["tasks.create", "tasks.get", "preference.get"])
    as_job = Context(task_actor(parent.id), correlation_id=parent.id)
    assert create(service, as_job, tools=["tasks.get"]).tools == ["tasks.get"]
    with pytest.raises(Forbidden, match=f"task {parent.id} may not grant models.pull") as refused:
        create(service, as_job, tools=["tasks.get", "models.pull"])
    assert "grant only preference.get, tasks.create, tasks.get" in (refused.value.hint or "")
    bare = create(service)
    with pytest.raises(Forbidden, match=r"may not grant tasks\.get") as refused:
        create(service, Context(task_actor(bare.id)), tools=["tasks.get"])
    assert refused.value.hint == "grant no tools"


def test_the_task_forms_tool_boxes_are_the_catalogues_names() -> None:
    script = (Path(__file__).parents[2] / "appliance/web/ui/app.js").read_text()
    found = re.search(r"const TOOL_NAMES = (\[[^\]]*\]);", script)
    assert found is not None
    assert tuple(json.loads(found.group(1))) == TOOL_NAMES


def test_a_jobs_environment_has_mcp_only_when_granted() -> None:
    assert JobAccess().env("t1") == {"TASK_ID": "t1"}
    granted = JobAccess(run_id="2", inference=False, tools=True)
    assert granted.env("t1") == {"TASK_ID": "t1", "RUN_ID": "2", "JOB_ID": granted.job_id, "MCP_URL": MCP_URL}
    assert MCP_URL == "http://127.0.0.1:11434/mcp"
    assert len(granted.job_id) == 16
    assert granted.job_id != JobAccess(tools=True).job_id  # a job's own, made at its start
    assert granted.routes() == {("POST", "/mcp"), ("GET", "/mcp"), ("DELETE", "/mcp")}
    assert ("POST", "/api/chat") in JobAccess(tools=True).routes()


def test_a_worker_gets_the_grant_and_its_forwarded_calls_hold_to_the_run(service: TaskService) -> None:
    task = create(service, tools=["preference.get"])
    claimed = service.claim_for_node("n1", SANDBOX)
    assert claimed is not None
    assert (claimed.id, claimed.tools, claimed.attempt) == (task.id, ["preference.get"], 1)
    assert "tools" not in claimed.limits
    assert service.node_acts_for(task.id, "n1", route="POST /mcp", run_id="1") == task_actor(task.id)
    assert service.node_acts_for(task.id, "n1", route="POST /api/chat", run_id="1") == task_actor(task.id)
    with pytest.raises(Forbidden, match=f"called for run 2 of task {task.id}, which is on run 1"):
        service.node_acts_for(task.id, "n1", route="POST /mcp", run_id="2")
    with pytest.raises(Forbidden, match=f"node n2 does not hold a lease on task {task.id}"):
        service.node_acts_for(task.id, "n2", route="POST /mcp", run_id="1")
    # The gateway audits the MCP calls, refused here or let through (as mcp.call); inference calls are here.
    rows = AuditService(service.store).list_events(action="task.inference")
    assert [(row.detail["route"], row.outcome) for row in rows] == [("POST /api/chat", "ok")]
