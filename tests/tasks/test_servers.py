"""The task queue of servers that share a PostgreSQL store: a task queued on one is claimed by
another's queue at once (the tasks topic of the change feed wakes it), and runs there once; a task
with attachments runs where they are, and output is read where the task ran."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import TaskElsewhere
from appliance.identity import Actor
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import Store, Task
from appliance.tasks.service import POLL_SECONDS, Attachment, NewTask, TaskEvent

ANN = Context(Actor(id="ann", kind="user", role="user"))


@pytest.fixture
def two_servers(postgres_url: str, shared_dir: Path) -> Iterator[tuple[Runtime, Runtime]]:
    """A runs the queue; B only takes requests (its queue is not started): a data dir each."""
    servers = [Runtime.open(Settings(data_dir=shared_dir / n, store={"url": postgres_url})) for n in "ab"]
    servers[0].tasks.start()
    yield servers[0], servers[1]
    for server in servers:
        server.close()


def stamp(text: str | None) -> datetime:
    assert text is not None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_task_queued_on_one_server_is_claimed_at_once_by_another(
    two_servers: tuple[Runtime, Runtime],
) -> None:
    runner, front = two_servers
    waits = []
    for n in range(5):
        time.sleep(0.3 * n % 1)  # at another point of the runner's poll each time
        task, _ = front.tasks.create(NewTask(mode="commands", text=f"echo {n}"), [], ANN)
        deadline = time.monotonic() + 60
        while (found := runner.store.get_task(task.id)) is not None and found.state in ("queued", "running"):
            assert time.monotonic() < deadline, f"task {task.id} is still {found.state}"
            time.sleep(0.05)
        assert found is not None
        assert (found.state, found.attempts) == ("succeeded", 1)
        assert runner.tasks.output(task.id, "stdout") == f"{n}\n"  # it ran on the runner
        waits.append((stamp(found.started_at) - stamp(found.created_at)).total_seconds())
    # polling alone would take up to POLL_SECONDS, half of it on average
    assert max(waits) < POLL_SECONDS / 2, waits


def test_a_follower_on_one_server_sees_a_task_another_runs_change_state(
    two_servers: tuple[Runtime, Runtime],
) -> None:
    runner, front = two_servers
    task, _ = front.tasks.create(NewTask(mode="commands", text="sleep 1"), [], ANN)

    async def collect() -> list[TaskEvent]:
        return [event async for event in front.tasks.follow(task.id, ANN.who)]

    ran = [("state", "running"), ("state", "succeeded"), ("end", "succeeded")]
    events = asyncio.run(asyncio.wait_for(collect(), timeout=60))
    seen = [(e.kind, e.data["state"]) for e in events if e.kind != "output"]
    # claimed at once: often before the follower's first look
    assert seen in ([("state", "queued"), *ran], ran), seen
    assert runner.store.list_audit(action="task.start")[0].target == task.id


def wait_until_ended(store: Store, task_id: str) -> Task:
    deadline = time.monotonic() + 60
    while (found := store.get_task(task_id)) is not None and found.state in ("queued", "running"):
        assert time.monotonic() < deadline, f"task {task_id} is still {found.state}"
        time.sleep(0.05)
    assert found is not None
    return found


def test_a_task_with_attachments_runs_only_on_the_server_holding_them(
    two_servers: tuple[Runtime, Runtime],
) -> None:
    runner, front = two_servers
    files = [Attachment("input.txt", b"from the front\n")]
    task, _ = front.tasks.create(NewTask(mode="commands", text="cat input.txt"), files, ANN)
    plain, _ = front.tasks.create(NewTask(mode="commands", text="echo any"), [], ANN)
    assert wait_until_ended(runner.store, plain.id).ran_on == runner.tasks.server  # anyone's to run
    found = runner.store.get_task(task.id)
    assert found is not None
    assert found.state == "queued"  # the runner does not hold its attachments: it leaves it

    front.tasks.start()
    ran = wait_until_ended(front.store, task.id)

    assert (ran.state, ran.attempts, ran.ran_on) == ("succeeded", 1, front.tasks.server)
    assert front.tasks.output(task.id, "stdout") == "from the front\n"


def test_output_another_server_holds_is_an_error_that_names_it(
    two_servers: tuple[Runtime, Runtime],
) -> None:
    runner, front = two_servers
    task, _ = front.tasks.create(NewTask(mode="commands", text="echo here"), [], ANN)
    wait_until_ended(runner.store, task.id)

    with pytest.raises(TaskElsewhere, match=f"ran on server {runner.tasks.server}") as raised:
        front.tasks.output(task.id, "stdout")

    assert raised.value.status == 409
    assert runner.tasks.output(task.id, "stdout") == "here\n"
