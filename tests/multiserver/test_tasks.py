"""Tasks on two servers that share one PostgreSQL: both queue and both claim, each task runs once."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.multiserver.servers import Pair
from tests.provision.test_pull_processes import wait_for
from tests.web.serving import Serving

TASKS = 200
FINISHED = ("succeeded", "failed", "canceled")


def test_two_hundred_tasks_created_on_both_servers_each_run_exactly_once(pair: Pair) -> None:
    servers = [pair.a, pair.b]

    def create(number: int) -> str:
        created = servers[number % 2].client.post(
            "/api/v1/tasks", json={"mode": "commands", "text": f"echo task-{number}"}
        )
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, range(TASKS)))

    tasks: dict[str, dict[str, Any]] = {}

    def all_finished() -> bool:
        listed = pair.b.client.get("/api/v1/tasks", params={"limit": 1000}).json()
        tasks.update({task["id"]: task for task in listed})
        return len(tasks) == TASKS and all(task["state"] in FINISHED for task in tasks.values())

    wait_for(all_finished, f"{TASKS} tasks to finish", timeout=300)
    assert set(tasks) == set(ids)
    assert Counter(task["state"] for task in tasks.values()) == {"succeeded": TASKS}
    assert Counter(task["attempts"] for task in tasks.values()) == {1: TASKS}

    # Each ran on one server: its output lives in that server's data dir, and says it ran there.
    ran_on: Counter[str] = Counter()
    for number, task_id in enumerate(ids):
        printed = {
            name: (data_dir / "tasks" / task_id / "stdout").read_text()
            for name, data_dir in zip("ab", pair.data_dirs, strict=True)
            if (data_dir / "tasks" / task_id / "stdout").exists()
        }
        assert list(printed.values()) == [f"task-{number}\n"], (task_id, printed)
        ran_on.update(printed.keys())
    assert sorted(ran_on) == ["a", "b"], ran_on  # both servers ran some
    # and the audit both servers share says each started once
    starts = pair.a.client.get("/api/v1/audit", params={"action": "task.start", "limit": 10_000}).json()
    assert Counter(event["target"] for event in starts) == dict.fromkeys(ids, 1)


def test_an_idempotency_key_sent_to_both_servers_at_once_makes_one_task(pair: Pair) -> None:
    def create(server: Serving) -> httpx.Response:
        body = {"mode": "commands", "text": "echo once"}
        return server.client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": "k-1"})

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(create, pair.both))
    assert sorted(answer.status_code for answer in answers) == [200, 201], [a.text for a in answers]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    assert [task["id"] for task in pair.a.client.get("/api/v1/tasks").json()] == [answers[0].json()["id"]]
