"""The task service on a real store and real bubblewrap: create, run, follow, cancel, recover."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import BodyTooLarge, InvalidInput, ModelNotFound, TaskFinished, TaskNotFound
from appliance.identity import Actor
from appliance.runtime import Runtime
from appliance.settings import Settings, TaskLimitSettings, TaskSettings
from appliance.store.base import Task
from appliance.tasks.jobs import Limits
from appliance.tasks.service import STOPPED_REASON, Attachment, NewTask, TaskEvent, TaskService

ANN = Context(Actor(id="ann", kind="user", role="user"))
BOB = Context(Actor(id="bob", kind="user", role="user"))
ADMIN = Context(Actor(id="root", kind="cli", role="admin"))


@pytest.fixture
def task_settings(shared_dir: Path) -> Settings:
    # The data dir sits in a folder nobody may pass through: as root, jobs run as that user.
    return Settings(
        data_dir=shared_dir / "data",
        tasks=TaskSettings(max_attachment_bytes=1000, limits=TaskLimitSettings(timeout_seconds=60)),
    )


@pytest.fixture
def runtime(task_settings: Settings) -> Iterator[Runtime]:
    runtime = Runtime.open(task_settings)
    yield runtime
    runtime.close()


@pytest.fixture
def service(runtime: Runtime) -> Iterator[TaskService]:
    runtime.tasks.start()
    yield runtime.tasks
    runtime.tasks.close()


def follow(service: TaskService, task_id: str, who: Actor = ANN.who) -> list[TaskEvent]:
    async def collect() -> list[TaskEvent]:
        return [event async for event in service.follow(task_id, who)]

    return asyncio.run(asyncio.wait_for(collect(), timeout=120))


def output_of(events: list[TaskEvent], stream: str = "stdout") -> str:
    return "".join(e.data["text"] for e in events if e.kind == "output" and e.data["stream"] == stream)


def test_the_limits_settings_are_the_jobs_limits() -> None:
    assert {limit.name for limit in fields(Limits)} == set(TaskLimitSettings.model_fields)


def test_a_script_runs_in_the_sandbox_and_its_output_is_kept(service: TaskService) -> None:
    task, added = service.create(
        NewTask(mode="script", text="echo hello; echo oops >&2; ls /work"),
        [Attachment("data.txt", b"attached\n")],
        ANN,
    )
    assert (added, task.state, task.actor) == (True, "queued", "user:ann")
    events = follow(service, task.id)
    assert events[-1].kind == "end"
    assert output_of(events) == "hello\ndata.txt\n"
    assert output_of(events, "stderr") == "oops\n"
    ended = service.get(task.id, ANN.who)
    assert (ended.state, ended.attempts) == ("succeeded", 1)
    assert ended.result is not None
    assert (ended.result["exit_code"], ended.result["reason"]) == (0, "exited with status 0")
    assert ended.result["truncated"] == {"stdout": False, "stderr": False}
    assert service.output(task.id, "stdout") == "hello\ndata.txt\n"
    # Followed after the end: the same output, from the files.
    assert output_of(follow(service, task.id)) == "hello\ndata.txt\n"
    actions = [e.action for e in service.store.list_audit(limit=10) if e.target == task.id]
    assert actions == ["task.finish", "task.start", "task.create"]


def test_commands_stop_at_the_first_that_fails_and_the_task_fails_with_the_reason(
    service: TaskService,
) -> None:
    task, _ = service.create(NewTask(mode="commands", text="echo one\nfalse\necho never"), [], ANN)
    events = follow(service, task.id)
    assert output_of(events) == "one\n"
    ended = events[-1].data
    assert (ended["state"], ended["result"]["reason"]) == ("failed", "exited with status 1")


def test_a_task_over_its_time_limit_is_stopped_with_the_reason(service: TaskService) -> None:
    task, _ = service.create(NewTask(mode="script", text="sleep 30", limits={"timeout_seconds": 1}), [], ANN)
    ended = follow(service, task.id)[-1].data
    assert (ended["state"], ended["result"]["reason"]) == ("failed", "stopped after its time limit of 1 s")
    assert ended["limits"]["timeout_seconds"] == 1.0


def test_cancel_stops_a_running_task_and_a_finished_one_stays_as_it_ended(service: TaskService) -> None:
    task, _ = service.create(NewTask(mode="script", text="echo started; sleep 60"), [], ANN)

    async def watch() -> list[TaskEvent]:
        seen = []
        async for event in service.follow(task.id, ANN.who):
            seen.append(event)
            if event.kind == "output":
                await asyncio.to_thread(service.cancel, task.id, ANN)
        return seen

    events = asyncio.run(asyncio.wait_for(watch(), timeout=60))
    ended = service.get(task.id, ANN.who)
    assert ended.state == "canceled"
    assert ended.result is not None
    assert ended.result["reason"] == "canceled by user:ann"
    assert events[-1].data["state"] == "canceled"
    assert service.output(task.id, "stdout") == "started\n"
    with pytest.raises(TaskFinished, match="is canceled"):
        service.cancel(task.id, ANN)


def test_a_queued_task_cancelled_never_runs(runtime: Runtime) -> None:
    task, _ = runtime.tasks.create(NewTask(mode="script", text="echo no"), [], ANN)  # no queue running
    assert runtime.tasks.cancel(task.id, ANN).state == "canceled"
    assert runtime.tasks.output(task.id, "stdout") == ""
    events = follow(runtime.tasks, task.id)
    assert [e.kind for e in events] == ["state", "end"]


def test_the_same_idempotency_key_gives_back_the_same_task(runtime: Runtime) -> None:
    request = NewTask(mode="script", text="echo once", idempotency_key="k1")
    first, added = runtime.tasks.create(request, [Attachment("a", b"1")], ANN)
    again, added_again = runtime.tasks.create(request, [Attachment("a", b"2")], ANN)
    assert (added, added_again, again) == (True, False, first)
    assert (runtime.tasks.task_dir(first.id) / "work" / "a").read_bytes() == b"1"
    replays = [e for e in runtime.store.list_audit(action="task.create") if e.detail.get("idempotent_replay")]
    assert [e.target for e in replays] == [first.id]
    others, _ = runtime.tasks.create(request, [], BOB)
    assert others.id != first.id
    assert len(list(runtime.tasks.root.iterdir())) == 2


def test_users_see_only_their_own_tasks_and_admins_see_all(runtime: Runtime) -> None:
    task, _ = runtime.tasks.create(NewTask(mode="script", text="echo mine"), [], ANN)
    with pytest.raises(TaskNotFound):
        runtime.tasks.get(task.id, BOB.who)
    with pytest.raises(TaskNotFound):
        runtime.tasks.cancel(task.id, BOB)
    assert runtime.tasks.list_tasks(BOB.who) == []
    assert [t.id for t in runtime.tasks.list_tasks(ADMIN.who)] == [task.id]
    assert runtime.tasks.get(task.id, ADMIN.who) == task


@pytest.mark.parametrize(
    ("request_", "attachments", "error", "message"),
    [
        (NewTask(mode="script", text="  \n"), [], InvalidInput, "the task's script is empty"),
        (NewTask(mode="script", text="a\0b"), [], InvalidInput, "NUL byte"),
        (NewTask(mode="script", text="x", limits={"cpu": 1}), [], InvalidInput, "'cpu' is not a task limit"),
        (
            NewTask(mode="script", text="x", limits={"timeout_seconds": 61}),
            [],
            InvalidInput,
            "timeout_seconds of 61 is above this appliance's 60",
        ),
        (NewTask(mode="script", text="x", limits={"processes": 0}), [], InvalidInput, "above zero"),
        (NewTask(mode="script", text="x", limits={"processes": 1.5}), [], InvalidInput, "whole number"),
        (NewTask(text="hi"), [], InvalidInput, "a prompt task needs a model"),
        (NewTask(text="hi", model="absent"), [], ModelNotFound, "absent"),
        (NewTask(mode="script", text="x"), [Attachment("../x", b"")], InvalidInput, "not an attachment name"),
        (NewTask(mode="script", text="x"), [Attachment("", b"")], InvalidInput, "not an attachment name"),
        (
            NewTask(mode="script", text="x"),
            [Attachment("a", b""), Attachment("a", b"")],
            InvalidInput,
            "two attachments are named 'a'",
        ),
        (
            NewTask(mode="script", text="x"),
            [Attachment("a", b"x" * 600), Attachment("b", b"x" * 600)],
            BodyTooLarge,
            "the task's attachments is larger than the limit of 1000 bytes",
        ),
    ],
)
def test_bad_input_is_refused_and_nothing_is_kept(
    runtime: Runtime, request_: NewTask, attachments: list[Attachment], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        runtime.tasks.create(request_, attachments, ANN)
    assert runtime.store.list_tasks() == []
    assert not runtime.tasks.root.exists() or list(runtime.tasks.root.iterdir()) == []


def dead_owner() -> str:
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}"


def test_a_task_left_running_by_a_dead_server_runs_once_more_then_fails(runtime: Runtime) -> None:
    task, _ = runtime.tasks.create(NewTask(mode="script", text="echo x"), [], ANN)
    far = "2999-01-01T00:00:00.000000Z"
    assert runtime.store.claim_task(owner=dead_owner(), lease_expires_at=far) is not None
    alive = runtime.store.create_task(
        Task(id="alive", mode="script", text="x", model=None, state="queued", actor="user:ann")
    )[0]
    runtime.store.claim_task(owner=f"{socket.gethostname()}:{os.getppid()}", lease_expires_at=far)
    (retried,) = runtime.tasks.recover(at_start=True)
    assert (retried.id, retried.state, retried.attempts) == (task.id, "queued", 1)
    assert runtime.store.get_task(alive.id).state == "running"  # type: ignore[union-attr]
    runtime.store.claim_task(owner=dead_owner(), lease_expires_at=far)
    (failed,) = runtime.tasks.recover(at_start=True)
    assert (failed.state, failed.attempts, failed.result) == ("failed", 2, {"reason": STOPPED_REASON})
    # A lease that expired counts as a dead process, wherever it ran.
    runtime.store.update_task(alive.id, lease_expires_at="2000-01-01T00:00:00.000000Z")
    assert [t.id for t in runtime.tasks.recover(at_start=False)] == [alive.id]


def test_stopping_the_queue_puts_a_running_task_back(runtime: Runtime) -> None:
    runtime.tasks.start()
    task, _ = runtime.tasks.create(NewTask(mode="script", text="echo begun; sleep 60"), [], ANN)

    async def first_output() -> None:
        async for event in runtime.tasks.follow(task.id, ANN.who):
            if event.kind == "output":
                return

    asyncio.run(asyncio.wait_for(first_output(), timeout=60))
    runtime.tasks.close()
    stopped = runtime.tasks.get(task.id, ANN.who)
    assert (stopped.state, stopped.attempts) == ("queued", 1)
    assert runtime.tasks.output(task.id, "stdout") == "begun\n"


def test_where_the_sandbox_cannot_run_a_script_fails_with_the_reason(runtime: Runtime) -> None:
    from appliance.tasks import Sandbox

    service = TaskService(
        runtime.settings, runtime.store, runtime.models, sandbox=Sandbox(bwrap="/nonexistent/bwrap")
    )
    service.start()
    try:
        task, _ = service.create(NewTask(mode="script", text="echo never"), [], ANN)
        ended = follow(service, task.id)[-1].data
    finally:
        service.close()
    assert ended["state"] == "failed"
    assert (
        ended["result"]["reason"] == "jobs cannot run here: bubblewrap is not installed (/nonexistent/bwrap)"
    )
    assert ended["result"]["error"] == "not_ready"
    assert "install bubblewrap" in ended["result"]["hint"]
