"""Tasks run by worker nodes under leases: the task service's node side, on a real store.

A node claims a script or commands task, fetches its attachments, streams its output, renews and
finishes it; each only while it holds the lease (a node thought dead cannot touch a task that
moved on), and the same finish twice is one end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.audit import Context
from appliance.errors import Forbidden, LeaseLost, TaskNotFound
from appliance.identity import Actor
from appliance.runtime import Runtime
from appliance.settings import Settings, TaskSettings
from appliance.store.base import Task
from appliance.tasks.service import Attachment, NewTask, NodeFinish, TaskEvent, TaskService
from tests.conftest import APPLIANCE, free_port

ROUTE = "POST /v1/chat/completions"
ANN = Context(Actor(id="ann", kind="user", role="user"))
JOBS: dict[str, Any] = {"sandbox": {"available": True}}  # a node whose sandbox can run jobs
FINISHED = NodeFinish(
    state="succeeded", result={"outcome": "exited", "exit_code": 0, "reason": "exited with status 0"}
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="appliance-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def open_runtime(shared_dir: Path, **tasks: Any) -> Runtime:
    return Runtime.open(Settings(data_dir=shared_dir / "data", tasks=TaskSettings(**tasks)))


@pytest.fixture
def runtime(shared_dir: Path) -> Iterator[Runtime]:
    runtime = open_runtime(shared_dir)
    yield runtime
    runtime.close()


def script(service: TaskService, text: str = "echo hi", *attachments: Attachment) -> str:
    task, _ = service.create(NewTask(mode="script", text=text), list(attachments), ANN)
    return task.id


def finishes(runtime: Runtime, task_id: str) -> list[Any]:
    return [e for e in runtime.store.list_audit(action="task.finish", limit=1000) if e.target == task_id]


def test_a_node_claims_the_oldest_script_with_its_attachments_and_lease(runtime: Runtime) -> None:
    tasks = runtime.tasks
    first = script(tasks, "cat data.txt", Attachment("data.txt", b"attached\n"))
    script(tasks)
    claimed = tasks.claim_for_node("n1", JOBS)
    assert claimed is not None
    assert (claimed.id, claimed.mode, claimed.text) == (first, "script", "cat data.txt")
    assert claimed.attachments == [{"name": "data.txt", "size_bytes": 9}]
    assert claimed.lease_seconds == 30.0
    assert claimed.attempt == 1
    assert claimed.inference is False
    assert claimed.limits["output_bytes"] == runtime.settings.tasks.limits.output_bytes
    row = runtime.store.get_task(first)
    assert row is not None
    assert (row.state, row.lease_owner, row.attempts) == ("running", "node:n1", 1)
    (start,) = [e for e in runtime.store.list_audit(action="task.start") if e.target == first]
    assert start.detail["node"] == "n1"


def test_prompts_stay_on_the_server_and_a_node_without_a_sandbox_gets_nothing(runtime: Runtime) -> None:
    tasks = runtime.tasks
    # A prompt (its model is the server's business) waits first: a node passes it by.
    runtime.store.create_task(
        Task(id="prompt1", mode="prompt", text="hi", model="tiny", state="queued", actor="user:ann")
    )
    assert tasks.claim_for_node("n1", JOBS) is None
    task_id = script(tasks)
    assert tasks.claim_for_node("n1", {}) is None
    assert tasks.claim_for_node("n1", {"sandbox": {"available": False}}) is None
    assert tasks.claim_for_node("n1", JOBS, drained=True) is None
    claimed = tasks.claim_for_node("n1", JOBS)
    assert claimed is not None
    assert claimed.id == task_id
    prompt = runtime.store.get_task("prompt1")
    assert prompt is not None
    assert prompt.state == "queued"


def test_tasks_where_local_gives_nodes_nothing(shared_dir: Path) -> None:
    runtime = open_runtime(shared_dir, where="local")
    try:
        script(runtime.tasks)
        assert runtime.tasks.claim_for_node("n1", JOBS) is None
    finally:
        runtime.close()


def test_renew_and_finish_from_another_node_are_refused(runtime: Runtime) -> None:
    tasks = runtime.tasks
    task_id = script(tasks)
    assert tasks.claim_for_node("n1", JOBS) is not None
    with pytest.raises(LeaseLost):
        tasks.node_renew(task_id, "n2", attempt=1)
    with pytest.raises(LeaseLost):
        tasks.node_finish(task_id, "n2", FINISHED, attempt=1)
    with pytest.raises(LeaseLost):
        tasks.node_output(task_id, "n2", "stdout", "not mine\n", attempt=1)
    with pytest.raises(TaskNotFound):
        tasks.node_renew("no-such-task", "n1", attempt=1)
    assert tasks.node_renew(task_id, "n1", attempt=1).lease_owner == "node:n1"
    row = runtime.store.get_task(task_id)
    assert row is not None
    assert row.state == "running"
    assert finishes(runtime, task_id) == []
    assert tasks.output(task_id, "stdout") == ""


def test_the_same_finish_twice_is_one_end(runtime: Runtime) -> None:
    tasks = runtime.tasks
    task_id = script(tasks)
    assert tasks.claim_for_node("n1", JOBS) is not None
    ended, duplicate = tasks.node_finish(task_id, "n1", FINISHED, attempt=1)
    assert (ended.state, duplicate, ended.result) == ("succeeded", False, {**FINISHED.result, "node": "n1"})
    again, duplicate = tasks.node_finish(task_id, "n1", FINISHED, attempt=1)
    assert (again.state, duplicate) == ("succeeded", True)
    assert len(finishes(runtime, task_id)) == 1
    with pytest.raises(LeaseLost):  # ended: no renewing it
        tasks.node_renew(task_id, "n1", attempt=1)
    with pytest.raises(LeaseLost):
        tasks.node_finish(task_id, "n2", FINISHED, attempt=1)


def test_renew_after_a_cancel_is_refused_and_the_finish_keeps_the_cancel(runtime: Runtime) -> None:
    tasks = runtime.tasks
    task_id = script(tasks)
    assert tasks.claim_for_node("n1", JOBS) is not None
    tasks.cancel(task_id, ANN)
    with pytest.raises(LeaseLost):
        tasks.node_renew(task_id, "n1", attempt=1)
    with pytest.raises(LeaseLost):  # its followers have the end: later output is refused
        tasks.node_output(task_id, "n1", "stdout", "late\n", attempt=1)
    cancelled = NodeFinish(state="canceled", result={"outcome": "cancelled", "reason": "cancelled"})
    ended, duplicate = tasks.node_finish(task_id, "n1", cancelled, attempt=1)
    assert (ended.state, duplicate) == ("canceled", False)
    assert ended.result is not None
    assert ended.result["reason"] == "canceled by user:ann"
    assert tasks.node_finish(task_id, "n1", FINISHED, attempt=1)[1] is True


def test_attachments_go_only_to_the_node_holding_the_lease(runtime: Runtime) -> None:
    tasks = runtime.tasks
    task_id = script(tasks, "cat a", Attachment("a", b"A"))
    with pytest.raises(Forbidden):  # queued: no one holds it
        tasks.node_attachment(task_id, "n1", "a")
    assert tasks.claim_for_node("n1", JOBS) is not None
    assert tasks.node_attachment(task_id, "n1", "a").read_bytes() == b"A"
    with pytest.raises(Forbidden):
        tasks.node_attachment(task_id, "n2", "a")
    for name in ("b", "..", "../stdout", ""):
        with pytest.raises(TaskNotFound):
            tasks.node_attachment(task_id, "n1", name)
    with pytest.raises(TaskNotFound):
        tasks.node_attachment("no-such-task", "n1", "a")


def test_output_reaches_the_files_and_live_followers_up_to_the_limit(shared_dir: Path) -> None:
    runtime = open_runtime(shared_dir, limits={"output_bytes": 9})
    tasks = runtime.tasks
    try:
        task_id = script(tasks)

        async def scenario() -> list[TaskEvent]:
            claimed = await asyncio.to_thread(tasks.claim_for_node, "n1", JOBS)
            assert claimed is not None
            seen: list[TaskEvent] = []

            async def follow() -> None:
                async for event in tasks.follow(task_id, ANN.who):
                    seen.append(event)

            follower = asyncio.create_task(follow())
            tasks.node_output(task_id, "n1", "stdout", "héllo ", attempt=1)
            tasks.node_output(task_id, "n1", "stderr", "oops\n", attempt=1)
            await asyncio.sleep(0.2)
            assert [e.data.get("text") for e in seen if e.kind == "output"] == ["héllo ", "oops\n"]
            # past 9 bytes: cut on a character
            tasks.node_output(task_id, "n1", "stdout", "wörld\n", attempt=1)
            tasks.node_output(task_id, "n1", "stdout", "more\n", attempt=1)
            truncated = {"truncated": {"stdout": False, "stderr": False}}
            finish = NodeFinish(state="succeeded", result={**FINISHED.result, **truncated})
            await asyncio.to_thread(tasks.node_finish, task_id, "n1", finish, attempt=1)
            await asyncio.wait_for(follower, 10)
            return seen

        seen = asyncio.run(scenario())
        assert tasks.output(task_id, "stdout") == "héllo w"
        assert tasks.output(task_id, "stderr") == "oops\n"
        assert seen[-1].kind == "end"
        assert seen[-1].data["state"] == "succeeded"
        assert "".join(
            e.data["text"] for e in seen if e.kind == "output" and e.data["stream"] == "stdout"
        ) == ("héllo w")
        row = runtime.store.get_task(task_id)
        assert row is not None
        assert row.result is not None
        assert row.result["truncated"] == {
            "stdout": True,
            "stderr": False,
        }  # cut here, past what the node sent
    finally:
        runtime.close()


def test_an_expired_node_lease_runs_again_on_another_node_exactly_once(shared_dir: Path) -> None:
    runtime = open_runtime(shared_dir, lease_seconds=1, where="workers")
    tasks = runtime.tasks
    offered: list[bool] = []
    tasks.on_queued = lambda: offered.append(True)
    try:
        task_id = script(tasks)
        assert offered == [True]
        assert tasks.claim_for_node("n1", JOBS) is not None
        tasks.node_output(task_id, "n1", "stdout", "first try\n", attempt=1)
        assert tasks.recover(at_start=False) == []  # its lease holds
        runtime.store.update_task(task_id, lease_expires_at="2000-01-01T00:00:00.000000Z")
        (retried,) = tasks.recover(at_start=False)
        assert (retried.state, retried.attempts, retried.lease_owner) == ("queued", 1, None)
        assert offered == [True, True]
        again = tasks.claim_for_node("n2", JOBS)
        assert again is not None
        assert again.id == task_id
        assert tasks.output(task_id, "stdout") == ""  # a retry's output starts anew
        # The node thought dead comes back: it may touch nothing.
        for late in (
            lambda: tasks.node_renew(task_id, "n1", attempt=1),
            lambda: tasks.node_output(task_id, "n1", "stdout", "late\n", attempt=1),
            lambda: tasks.node_finish(task_id, "n1", FINISHED, attempt=1),
        ):
            with pytest.raises(LeaseLost):
                late()
        assert again.attempt == 2
        tasks.node_output(task_id, "n2", "stdout", "second try\n", attempt=2)
        ended, _ = tasks.node_finish(task_id, "n2", FINISHED, attempt=2)
        assert (ended.state, ended.attempts, ended.result and ended.result["node"]) == ("succeeded", 2, "n2")
        assert tasks.output(task_id, "stdout") == "second try\n"
        (finish,) = finishes(runtime, task_id)
        assert finish.detail["node"] == "n2"
        # A second expiry past MAX_ATTEMPTS fails it instead.
        other = script(tasks)
        for node in ("n1", "n2"):
            assert tasks.claim_for_node(node, JOBS) is not None
            runtime.store.update_task(other, lease_expires_at="2000-01-01T00:00:00.000000Z")
            tasks.recover(at_start=False)
        failed = runtime.store.get_task(other)
        assert failed is not None
        assert (failed.state, failed.attempts) == ("failed", 2)
    finally:
        runtime.close()


def test_a_late_call_of_an_earlier_attempt_on_the_same_node_is_refused(shared_dir: Path) -> None:
    """The task comes back to the node that lost it: its old job's calls must not count for the new one."""
    runtime = open_runtime(shared_dir, lease_seconds=1, where="workers")
    tasks = runtime.tasks
    try:
        task_id = script(tasks)
        first = tasks.claim_for_node("n1", JOBS)
        assert first is not None
        assert first.attempt == 1
        runtime.store.update_task(task_id, lease_expires_at="2000-01-01T00:00:00.000000Z")
        (retried,) = tasks.recover(at_start=False)
        assert retried.state == "queued"
        with pytest.raises(LeaseLost):  # waiting again: no attempt runs
            tasks.node_output(task_id, "n1", "stdout", "between\n", attempt=1)
        second = tasks.claim_for_node("n1", JOBS)
        assert second is not None
        assert (second.id, second.attempt) == (task_id, 2)
        # The old job, still going on n1, the lease owner again.
        for late in (
            lambda: tasks.node_renew(task_id, "n1", attempt=1),
            lambda: tasks.node_output(task_id, "n1", "stdout", "old\n", attempt=1),
            lambda: tasks.node_finish(task_id, "n1", FINISHED, attempt=1),
            lambda: tasks.node_renew(task_id, "n1", attempt=3),  # one never handed out
        ):
            with pytest.raises(LeaseLost):
                late()
        row = runtime.store.get_task(task_id)
        assert row is not None
        assert (row.state, row.attempts, row.lease_owner) == ("running", 2, "node:n1")
        assert finishes(runtime, task_id) == []
        assert tasks.node_renew(task_id, "n1", attempt=2).attempts == 2
        tasks.node_output(task_id, "n1", "stdout", "new\n", attempt=2)
        ended, duplicate = tasks.node_finish(task_id, "n1", FINISHED, attempt=2)
        assert (ended.state, ended.attempts, duplicate) == ("succeeded", 2, False)
        assert tasks.output(task_id, "stdout") == "new\n"
        with pytest.raises(LeaseLost):  # the old attempt's finish, now late: not a duplicate either
            tasks.node_finish(task_id, "n1", FINISHED, attempt=1)
        assert tasks.node_finish(task_id, "n1", FINISHED, attempt=2)[1] is True
        (finish,) = finishes(runtime, task_id)
        assert finish.detail["node"] == "n1"
    finally:
        runtime.close()


def test_with_tasks_on_workers_the_server_runs_no_script_itself(shared_dir: Path) -> None:
    runtime = open_runtime(shared_dir, where="workers")
    tasks = runtime.tasks
    tasks.start()
    try:
        task_id = script(tasks)
        asyncio.run(asyncio.sleep(1.5))  # the queue polls every second
        row = runtime.store.get_task(task_id)
        assert row is not None
        assert row.state == "queued"
        assert tasks.claim_for_node("n1", JOBS) is not None
    finally:
        runtime.close()


def test_a_node_acts_for_a_task_only_while_it_holds_the_lease(runtime: Runtime) -> None:
    tasks = runtime.tasks
    task_id = script(tasks)
    with pytest.raises(Forbidden):  # queued
        tasks.node_acts_for(task_id, "n1", route=ROUTE)
    assert tasks.claim_for_node("n1", JOBS) is not None
    assert tasks.node_acts_for(task_id, "n1", route=ROUTE) == Actor(id=task_id, kind="task", role="user")
    with pytest.raises(Forbidden):
        tasks.node_acts_for(task_id, "n2", route=ROUTE)
    with pytest.raises(Forbidden):  # the gateway audits this one, as mcp.call: no row here
        tasks.node_acts_for(task_id, "n2", route="POST /mcp")
    with pytest.raises(Forbidden):
        tasks.node_acts_for("no-such-task", "n1", route=ROUTE)
    tasks.node_finish(task_id, "n1", FINISHED, attempt=1)
    with pytest.raises(Forbidden):  # ended
        tasks.node_acts_for(task_id, "n1", route=ROUTE)
    calls = [e for e in runtime.store.list_audit(action="task.inference") if e.target == task_id]
    assert [(e.outcome, e.actor, e.detail["node"]) for e in reversed(calls)] == [
        ("error", f"task:{task_id}", "n1"),
        ("ok", f"task:{task_id}", "n1"),
        ("error", f"task:{task_id}", "n2"),
        ("error", f"task:{task_id}", "n1"),
    ]


# -- over HTTP: a real server, and workers that are real processes --------------------------------

# A job's MCP call, JSON-RPC by hand: preference.get of offline, with the job's own ids.
MCP_CALL = """#!/usr/bin/python3
import json, os, urllib.request
ids = {name.lower(): os.environ[name] for name in ("TASK_ID", "RUN_ID", "JOB_ID")}
params = {"name": "preference.get", "arguments": {"key": "offline"}, "_meta": ids}
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).encode()
headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
request = urllib.request.Request(os.environ["MCP_URL"], data=body, headers=headers)
print(json.load(urllib.request.urlopen(request, timeout=60))["result"]["structuredContent"]["value"])
"""


@dataclass
class Cluster:
    url: str
    data_dir: Path
    client: httpx.Client
    process: subprocess.Popen[str]

    def join(self, name: str) -> tuple[str, str]:
        """A node joined with a sandbox that runs jobs: its id and credential."""
        token = self.client.post("/api/v1/nodes/tokens", json={"expires": "1h"})
        assert token.status_code == 201, token.text
        joined = self.client.post(
            "/api/v1/cluster/join",
            json={"token": token.json()["token"], "name": name, "capabilities": JOBS},
        )
        assert joined.status_code == 201, joined.text
        return joined.json()["node_id"], joined.json()["credential"]

    def task(self, text: str, **fields: Any) -> str:
        created = self.client.post("/api/v1/tasks", json={"mode": "script", "text": text, **fields})
        assert created.status_code == 201, created.text
        task_id: str = created.json()["id"]
        return task_id

    def get(self, task_id: str) -> dict[str, Any]:
        task: dict[str, Any] = self.client.get(f"/api/v1/tasks/{task_id}").json()
        return task

    def wait(self, task_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (task := self.get(task_id))["state"] not in states:
            assert time.monotonic() < deadline, f"task {task_id} stayed {task['state']}"
            time.sleep(0.1)
        return task

    def audit(self, action: str, task_id: str) -> list[dict[str, Any]]:
        rows = self.client.get("/api/v1/audit", params={"action": action, "limit": 1000}).json()
        return [row for row in rows if row["target"] == task_id]


@pytest.fixture
def cluster(shared_dir: Path) -> Iterator[Cluster]:
    """``appliance serve`` with tasks on workers only and 3-second leases."""
    data_dir = shared_dir / "server"
    port = free_port()
    env = {**os.environ, "APPLIANCE_TASKS__WHERE": "workers", "APPLIANCE_TASKS__LEASE_SECONDS": "3"}
    process = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30)
    deadline = time.monotonic() + 30
    while True:
        with suppress(httpx.TransportError):
            if client.get("/readyz").status_code in (200, 503):
                break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"appliance serve did not start:\n{process.communicate()[0]}")
        time.sleep(0.1)
    yield Cluster(url, data_dir, client, process)
    client.close()
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.stdout is not None
    process.stdout.close()


def node_client(cluster: Cluster, credential: str) -> httpx.Client:
    return httpx.Client(base_url=cluster.url, headers={"authorization": f"Bearer {credential}"}, timeout=30)


ROUTES = "/api/v1/cluster/tasks"


def test_the_routes_refuse_a_node_that_does_not_hold_the_lease(cluster: Cluster) -> None:
    """Error paths, with httpx playing two workers."""
    _, one = cluster.join("w1")
    _, two = cluster.join("w2")
    with node_client(cluster, one) as w1, node_client(cluster, two) as w2:
        assert cluster.client.post(f"{ROUTES}/claim", json={}).status_code == 401  # no node credential
        assert w1.post(f"{ROUTES}/claim", json={}).json() == {"task": None}
        assert w1.post("/api/v1/cluster/heartbeat", json={}).status_code == 200  # ready: it is woken
        task_id = cluster.task("cat a", limits={"timeout_seconds": 30})
        woken = w1.get("/api/v1/cluster/work", params={"wait": 5}).json()["items"]
        assert [item["kind"] for item in woken] == ["tasks"]
        claimed = w1.post(f"{ROUTES}/claim", json={}).json()["task"]
        assert (claimed["id"], claimed["lease_seconds"], claimed["attachments"]) == (task_id, 3.0, [])
        assert claimed["attempt"] == 1
        first = {"attempt": 1}
        assert w2.post(f"{ROUTES}/claim", json={}).json() == {"task": None}
        # Its job's inference calls act as the task, from the node holding it only.
        as_task = {"x-appliance-task": task_id}
        assert w1.get("/v1/models", headers=as_task).status_code == 200
        assert w2.get("/v1/models", headers=as_task).status_code == 403
        assert cluster.client.get("/v1/models", headers=as_task).status_code == 403  # no node credential
        # ... and only for the task's current attempt, when the call names its run.
        current, earlier = (
            {**as_task, "x-appliance-run": run, "x-appliance-job": "j1"} for run in ("1", "2")
        )
        assert w1.get("/v1/models", headers=current).status_code == 200
        late = w1.get("/v1/models", headers=earlier)
        assert late.status_code == 403
        assert f"called for run 2 of task {task_id}, which is on run 1" in late.json()["error"]["message"]
        calls = [(row["outcome"], row["actor"]) for row in reversed(cluster.audit("task.inference", task_id))]
        assert calls == [("ok", f"task:{task_id}"), ("error", f"task:{task_id}")] * 2
        # An MCP call it forwards must name the job's run and job, which the gateway holds it to.
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        unnamed = w1.post("/mcp", headers=as_task, json=listing)
        assert unnamed.status_code == 403
        assert "without its x-appliance-run and x-appliance-job headers" in unnamed.text
        assert w1.post("/mcp", headers=earlier, json=listing).status_code == 403
        # each refusal audited once, by the gateway, and not as an inference call
        refused = [row["detail"]["result"] for row in cluster.audit("mcp.call", "tools/list")]
        assert refused == ["denied", "denied"]
        assert len(cluster.audit("task.inference", task_id)) == 4
        # The other node: 409 on renew, output and finish, 403 on an attachment.
        finish = {"state": "succeeded", "result": {"outcome": "exited", "exit_code": 0}}
        line = b'{"stream": "stdout", "text": "x"}\n'
        for path, body in (("renew", {}), ("finish", finish)):
            refused = w2.post(f"{ROUTES}/{task_id}/{path}", params=first, json=body)
            assert (refused.status_code, refused.json()["code"]) == (409, "lease_lost")
        out = w2.post(f"{ROUTES}/{task_id}/output", params=first, content=line)
        assert (out.status_code, out.json()["code"]) == (409, "lease_lost")
        # The holder, for an attempt it was not handed: 409; with none or a bad one: 400.
        for path, body in (("renew", {}), ("finish", finish)):
            refused = w1.post(f"{ROUTES}/{task_id}/{path}", params={"attempt": 2}, json=body)
            assert (refused.status_code, refused.json()["code"]) == (409, "lease_lost")
            for params in ({}, {"attempt": 0}, {"attempt": "one"}):
                bad = w1.post(f"{ROUTES}/{task_id}/{path}", params=params, json=body)
                assert bad.status_code == 400, (path, params, bad.text)
        out = w1.post(f"{ROUTES}/{task_id}/output", params={"attempt": 2}, content=line)
        assert (out.status_code, out.json()["code"]) == (409, "lease_lost")
        assert w1.post(f"{ROUTES}/{task_id}/output", content=line).status_code == 400
        assert w2.get(f"{ROUTES}/{task_id}/attachments/a").status_code == 403
        assert w1.get(f"{ROUTES}/{task_id}/attachments/a").status_code == 404  # none by that name
        bad = w1.post(f"{ROUTES}/{task_id}/output", params=first, content=b"not json\n")
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_input")
        bad = w1.post(f"{ROUTES}/{task_id}/finish", params=first, json={"state": "running", "result": {}})
        assert bad.status_code == 400
        # The holder: output, then the same finish twice is one end.
        lines = b'{"stream": "stdout", "text": "hi\\n"}\n{"stream": "stderr", "text": "oops\\n"}\n'
        assert w1.post(f"{ROUTES}/{task_id}/output", params=first, content=lines).json() == {"lines": 2}
        assert w1.post(f"{ROUTES}/{task_id}/renew", params=first, json={}).status_code == 200
        assert w1.post(f"{ROUTES}/{task_id}/finish", params=first, json=finish).json() == {
            "state": "succeeded",
            "duplicate": False,
        }
        assert w1.post(f"{ROUTES}/{task_id}/finish", params=first, json=finish).json() == {
            "state": "succeeded",
            "duplicate": True,
        }
        assert cluster.client.get(f"/api/v1/tasks/{task_id}/output").json() == {
            "stdout": "hi\n",
            "stderr": "oops\n",
        }
        assert len(cluster.audit("task.finish", task_id)) == 1
        # Renew after a cancel: 409, and the worker stops.
        cancelled = cluster.task("sleep 30")
        assert w1.post(f"{ROUTES}/claim", json={}).json()["task"]["id"] == cancelled
        assert cluster.client.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
        renew = w1.post(f"{ROUTES}/{cancelled}/renew", params=first, json={})
        assert (renew.status_code, renew.json()["code"]) == (409, "lease_lost")


def start_worker(cluster: Cluster, name: str, data_dir: Path) -> tuple[str, subprocess.Popen[str]]:
    """``appliance worker join`` in its own process and data dir; its node id once it joined."""
    token = cluster.client.post("/api/v1/nodes/tokens", json={"expires": "1h"}).json()["token"]
    process = subprocess.Popen(
        [
            *APPLIANCE,
            "worker",
            "join",
            cluster.url,
            "--token",
            token,
            "--name",
            name,
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        nodes = {node["name"]: node for node in cluster.client.get("/api/v1/nodes").json()}
        if name in nodes and nodes[name]["capabilities"].get("sandbox", {}).get("available"):
            return nodes[name]["id"], process
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"worker {name} did not join:\n{process.communicate()[0]}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    output = process.communicate()[0]
    return output


def test_a_task_runs_on_a_worker_and_a_killed_workers_task_finishes_on_the_other_once(
    cluster: Cluster, shared_dir: Path
) -> None:
    """Two ``appliance worker`` processes, tasks on workers only; one is SIGKILLed mid-task."""
    workers = dict(start_worker(cluster, name, shared_dir / name) for name in ("w1", "w2"))
    nodes = set(workers)
    try:
        # Output reaches `tasks logs --follow` while the job still runs.
        created = cluster.client.post(
            "/api/v1/tasks",
            data={"mode": "script", "text": "echo start; sleep 2; cat /work/a"},
            files={"attachment": ("a", b"attached\n")},
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        port = cluster.url.rsplit(":", 1)[1]
        logs = subprocess.Popen(
            [
                *APPLIANCE,
                "--data-dir",
                str(cluster.data_dir),
                "tasks",
                "logs",
                task_id,
                "--follow",
                "--port",
                port,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert logs.stdout is not None
        assert logs.stdout.readline() == "start\n"
        assert cluster.get(task_id)["state"] == "running"  # seen live, before the job ended
        assert logs.stdout.readline() == "attached\n"
        assert logs.wait(timeout=30) == 0
        logs.stdout.close()
        ended = cluster.wait(task_id, "succeeded", "failed")
        assert (ended["state"], ended["attempts"]) == ("succeeded", 1)
        assert ended["result"]["node"] in nodes

        # A job on a worker calls models through its worker's forwarder and the server.
        call = (
            "import os, urllib.request; "
            "print(urllib.request.urlopen(os.environ['INFERENCE_URL'] + '/models').status)"
        )
        asking = cluster.task(f'python3 -c "{call}"', inference=True)
        ended = cluster.wait(asking, "succeeded", "failed")
        output = cluster.client.get(f"/api/v1/tasks/{asking}/output").json()
        assert (ended["state"], output["stdout"]) == ("succeeded", "200\n"), output
        (inference,) = cluster.audit("task.inference", asking)
        assert (inference["outcome"], inference["actor"]) == ("ok", f"task:{asking}")
        assert inference["detail"]["node"] == ended["result"]["node"]

        # A job granted a tool calls it through its worker's forwarder, as its task, on its run.
        granted = cluster.task(MCP_CALL, tools=["preference.get"])
        ended = cluster.wait(granted, "succeeded", "failed")
        output = cluster.client.get(f"/api/v1/tasks/{granted}/output").json()
        assert (ended["state"], output["stdout"]) == ("succeeded", "False\n"), output
        (call,) = [
            row for row in cluster.audit("mcp.call", "preference.get") if row["actor"] == f"task:{granted}"
        ]
        assert (call["detail"]["result"], call["detail"]["task_id"], call["detail"]["run_id"]) == (
            "ok",
            granted,
            "1",
        )
        assert cluster.audit("task.inference", granted) == []  # the gateway's row is the call's

        # A cancel reaches the job on its worker at its next renew: it stops at once.
        cancelled = cluster.task("echo started; sleep 60")
        cluster.wait(cancelled, "running")
        assert cluster.client.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
        deadline = time.monotonic() + 15
        while "node" not in (cluster.get(cancelled)["result"] or {}):  # the worker's finish came
            assert time.monotonic() < deadline, cluster.get(cancelled)
            time.sleep(0.1)
        stopped = cluster.get(cancelled)
        assert (stopped["state"], stopped["result"]["outcome"]) == ("canceled", "cancelled")
        assert stopped["result"]["duration_seconds"] < 10

        # SIGKILL the worker running a long task: it finishes on the other, exactly once.
        long_task = cluster.task("echo started; sleep 3; echo done")
        cluster.wait(long_task, "running")
        (start,) = cluster.audit("task.start", long_task)
        first = start["detail"]["node"]
        workers[first].send_signal(signal.SIGKILL)
        workers[first].wait(timeout=10)
        ended = cluster.wait(long_task, "succeeded", "failed", timeout=60)
        assert (ended["state"], ended["attempts"]) == ("succeeded", 2)
        (other,) = set(nodes) - {first}
        assert ended["result"]["node"] == other
        # The row is written as the finish's update commits: give it that moment, then count.
        deadline = time.monotonic() + 10
        while not cluster.audit("task.finish", long_task) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        (finish,) = cluster.audit("task.finish", long_task)
        assert (finish["outcome"], finish["detail"]["node"]) == ("ok", other)
        assert [row["detail"]["attempts"] for row in cluster.audit("task.retry", long_task)] == [1]
        assert cluster.client.get(f"/api/v1/tasks/{long_task}/output").json()["stdout"] == "started\ndone\n"
    finally:
        logs_of = {node: stop(process) for node, process in workers.items()}
    assert all("Traceback" not in text for text in logs_of.values()), logs_of
