"""``appliance tasks`` against a real server: create (with attachments), follow, ls, show, logs, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.web.serving import Serving, serving
from tests.web.tasking import data_dir

__all__ = ["data_dir"]  # the fixture this module uses from tasking


@pytest.fixture
def served(data_dir: Path) -> Iterator[Serving]:
    with serving(data_dir) as server:
        yield server


def test_create_with_an_attachment_and_follow_it(served: Serving, cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a\nb\nc\n")
    port = str(served.port)
    run = cli(
        "tasks", "create", "--mode", "script", "--attach", str(data), "wc -l < /work/data.csv; echo e >&2",
        "--tools", "tasks.get, preference.get", "--follow", "--port", port,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == "3\n"
    assert "e\n" in run.stderr
    assert "succeeded: exited with status 0" in run.stderr
    (task,) = json.loads(cli("tasks", "ls", "--json", "--port", port).stdout)
    shown = cli("tasks", "show", task["id"], "--port", port)
    assert f"task {task['id']} succeeded" in shown.stdout
    assert "result.exit_code: 0" in shown.stdout
    assert "tools: preference.get, tasks.get\n" in shown.stdout
    logs = cli("tasks", "logs", task["id"], "--port", port)
    assert (logs.stdout, logs.stderr) == ("3\n", "e\n")
    followed = cli("tasks", "logs", task["id"], "--follow", "--port", port)
    assert followed.stdout == "3\n"


def test_a_failing_task_exits_1_with_its_reason(served: Serving, cli: Any) -> None:
    run = cli(
        "tasks", "create", "--mode", "commands", "echo one\nexit 4", "--follow", "--port", str(served.port)
    )
    assert run.returncode == 1
    assert run.stdout == "one\n"
    assert "failed: exited with status 4" in run.stderr


def test_cancel_a_running_task_and_the_errors_a_user_sees(served: Serving, cli: Any) -> None:
    port = str(served.port)
    created = cli(
        "tasks", "create", "--mode", "script", "-", "--key", "k", "--tools", "tasks.get", "--port", port,
        input="sleep 60\n",
    )  # fmt: skip
    task_id = created.stdout.strip()
    shown = json.loads(cli("tasks", "show", task_id, "--json", "--port", port).stdout)
    assert shown["tools"] == ["tasks.get"]
    again = cli("tasks", "create", "--mode", "script", "other", "--key", "k", "--port", port)
    assert again.stdout.strip() == task_id  # the same key: the same task
    running = cli("tasks", "ls", "--state", "queued", "--state", "running", "--port", port)
    assert task_id in running.stdout
    cancelled = cli("tasks", "cancel", task_id, "--port", port)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (
        0,
        f"task {task_id} canceled: canceled by api:127.0.0.1",
    )
    twice = cli("tasks", "cancel", task_id, "--port", port)
    assert twice.returncode == 1
    assert "is canceled" in twice.stderr
    missing = cli("tasks", "show", "nope", "--port", port)
    assert (missing.returncode, "task nope not found" in missing.stderr) == (1, True)
    bad_limit = cli(
        "tasks", "create", "--mode", "script", "ls", "--limit", "timeout_seconds=soon", "--port", port
    )
    assert bad_limit.returncode == 1
    assert "is not NAME=NUMBER" in bad_limit.stderr
    bad_tool = cli("tasks", "create", "--mode", "script", "ls", "--tools", "shell", "--port", port)
    assert bad_tool.returncode == 1
    assert "no MCP tool is named 'shell'" in bad_tool.stderr
    no_model = cli("tasks", "create", "hello", "--port", port)
    assert (no_model.returncode, "a prompt task needs a model" in no_model.stderr) == (1, True)


def test_without_a_server_it_says_so(cli: Any) -> None:
    run = cli("tasks", "ls", "--port", str(free_port()))
    assert run.returncode == 1
    assert "no appliance server answers" in run.stderr


def test_inference_lets_a_job_list_the_models_with_or_without_attachments(
    served: Serving, cli: Any, tmp_path: Path
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("listed\n")
    script = 'curl -s "$OLLAMA_BASE_URL/api/tags"; echo; cat /work/note.txt'
    port = str(served.port)
    for attach in ((), ("--attach", str(note))):
        run = cli(
            "tasks", "create", "--mode", "script", "--inference", *attach, script, "--follow", "--port", port
        )
        if not attach:
            assert run.returncode == 1  # no note.txt: cat fails, after the listing
        else:
            assert run.returncode == 0, run.stderr
            assert run.stdout.endswith("listed\n")
        assert json.loads(run.stdout.splitlines()[0]) == {"models": []}
    tasks = json.loads(cli("tasks", "ls", "--json", "--port", port).stdout)
    assert [task["inference"] for task in tasks] == [True, True]
