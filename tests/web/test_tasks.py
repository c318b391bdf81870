"""``/api/v1/tasks`` on a real server: scripts in real bubblewrap, prompts on the tiny model,
attachments, events, cancel, 413s, and a server killed while a task runs."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import import_file
from tests.web.conftest import Keys, isolated
from tests.web.serving import Serving, serving
from tests.web.tasking import data_dir

__all__ = ["data_dir"]  # the fixture this module uses from tasking


LIMITS = {
    "APPLIANCE_TASKS__MAX_ATTACHMENT_BYTES": "100",
    "APPLIANCE_SERVER__MAX_BODY_BYTES": "4096",
}


@pytest.fixture
def served(data_dir: Path) -> Iterator[Serving]:
    with serving(data_dir, env=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def refusing(shared_data_dir: Path) -> Iterator[Serving]:
    """One server with the limits for the module's tests that run no task and read no list."""
    with ExitStack() as stack:
        with isolated(shared_data_dir.parent):
            started = stack.enter_context(serving(shared_data_dir, env=LIMITS))
        yield started


def events(
    client: httpx.Client, task_id: str, headers: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """The task's server-sent events, to its end."""
    found = []
    with client.stream("GET", f"/api/v1/tasks/{task_id}/events", timeout=120, headers=headers) as response:
        assert response.status_code == 200
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                found.append((kind, json.loads(line.partition(":")[2])))
                if kind == "end":
                    break
    return found


def printed(found: list[tuple[str, Any]], stream: str = "stdout") -> str:
    return "".join(data["text"] for kind, data in found if kind == "output" and data["stream"] == stream)


def test_a_script_task_runs_and_its_output_streams(served: Serving) -> None:
    created = served.client.post(
        "/api/v1/tasks", json={"mode": "script", "text": "echo hi; echo no >&2; exit 3"}
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert (task["state"], task["mode"], task["actor"]) == ("queued", "script", "api:127.0.0.1")
    found = events(served.client, task["id"])
    assert found[0][0] == "state"
    assert (printed(found), printed(found, "stderr")) == ("hi\n", "no\n")
    ended = found[-1][1]
    assert (ended["state"], ended["result"]["exit_code"]) == ("failed", 3)
    assert ended["result"]["reason"] == "exited with status 3"
    shown = served.client.get(f"/api/v1/tasks/{task['id']}").json()
    assert shown == ended
    listed = served.client.get("/api/v1/tasks", params={"state": "failed"}).json()
    assert [t["id"] for t in listed] == [task["id"]]
    assert served.client.get("/api/v1/tasks", params={"state": "queued"}).json() == []


def test_readiness_says_whether_the_sandbox_runs_here(refusing: Serving) -> None:
    sandbox = refusing.client.get("/readyz").json()["details"]["sandbox"]
    assert (sandbox["available"], sandbox["reason"], sandbox["no_new_privs"]) == (True, None, True)
    assert sandbox["limits"]


def test_commands_with_attachments_from_a_form(served: Serving) -> None:
    created = served.client.post(
        "/api/v1/tasks",
        data={
            "mode": "commands",
            "text": "cat /work/a.txt\nwc -c < /work/b.bin",
            "limits": '{"timeout_seconds": 30}',
        },
        files=[("attachment", ("a.txt", b"from a file\n")), ("attachment", ("b.bin", b"\0" * 7))],
    )
    assert created.status_code == 201, created.text
    assert created.json()["limits"]["timeout_seconds"] == 30
    found = events(served.client, created.json()["id"])
    assert printed(found) == "from a file\n7\n"
    assert found[-1][1]["state"] == "succeeded"


def test_the_same_idempotency_key_gives_back_the_same_task(served: Serving) -> None:
    body = {"mode": "script", "text": "echo once"}
    first = served.client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": "k-1"})
    again = served.client.post("/api/v1/tasks", json={**body, "idempotency_key": "k-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_oversized_attachments_and_bodies_get_413_with_the_limit(served: Serving) -> None:
    too_many = served.client.post(
        "/api/v1/tasks", data={"mode": "script", "text": "ls"}, files=[("attachment", ("a", b"x" * 101))]
    )
    assert too_many.status_code == 413
    assert too_many.json()["code"] == "payload_too_large"
    assert "limit of 100 bytes" in too_many.json()["detail"]
    assert "tasks.max_attachment_bytes" in too_many.json()["hint"]
    too_big = served.client.post("/api/v1/tasks", json={"mode": "script", "text": "#" * 5000})
    assert too_big.status_code == 413
    assert "limit of 4096 bytes" in too_big.json()["detail"]
    big_form = served.client.post(
        "/api/v1/tasks", data={"mode": "script", "text": "ls"}, files=[("attachment", ("a", b"x" * 5000))]
    )
    assert (big_form.status_code, "limit of 4096 bytes" in big_form.json()["detail"]) == (413, True)
    assert served.client.get("/api/v1/tasks").json() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"content": b""}, "missing request body"),
        ({"json": {"mode": "shell", "text": "ls"}}, "mode"),
        ({"json": {"mode": "script", "text": "ls", "extra": 1}}, "extra"),
        (
            {"json": {"mode": "script", "text": "ls", "limits": {"timeout_seconds": 1e9}}},
            "above this appliance's",
        ),
        ({"json": {"text": "hello"}}, "a prompt task needs a model"),
        (
            {"json": {"text": "hello", "model": "tiny", "inference": True}},
            "inference is for script and commands",
        ),
        (
            {"json": {"text": "hello", "model": "tiny", "tools": ["preference.get"]}},
            "tools are for script and commands tasks",
        ),
        ({"json": {"mode": "script", "text": "ls", "tools": ["shell"]}}, "no MCP tool is named 'shell'"),
        (
            {"data": {"mode": "script", "text": "ls", "tools": ["preference.get", "a,b"]}},
            "no MCP tool is named 'a', 'b'",
        ),
        ({"data": {"mode": "script", "text": "ls", "limits": "{"}}, "limits is not JSON"),
        ({"data": {"mode": "script", "text": "ls", "shell": "bash"}}, "'shell' is not a task field"),
        ({"data": {"mode": "script"}, "files": [("attachment", ("x", b"1"))]}, "text"),
        ({"data": {"mode": "script", "text": "ls"}, "files": [("other", ("x", b"1"))]}, "form field 'other'"),
        (
            {"data": {"mode": "script", "text": "ls"}, "files": [("attachment", ("..", b"1"))]},
            "attachment name",
        ),
    ],
)
def test_bad_requests_are_refused_with_what_was_wrong(
    refusing: Serving, kwargs: dict[str, Any], message: str
) -> None:
    response = refusing.client.post("/api/v1/tasks", **kwargs)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]


def test_cancel_and_what_is_not_there(served: Serving) -> None:
    task = served.client.post("/api/v1/tasks", json={"mode": "script", "text": "echo up; sleep 60"}).json()
    with served.client.stream("GET", f"/api/v1/tasks/{task['id']}/events", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: output"):
                break
    cancelled = served.client.post(f"/api/v1/tasks/{task['id']}/cancel")
    assert (cancelled.status_code, cancelled.json()["state"]) == (200, "canceled")
    found = events(served.client, task["id"])
    assert printed(found) == "up\n"
    assert found[-1][1]["state"] == "canceled"
    again = served.client.post(f"/api/v1/tasks/{task['id']}/cancel")
    assert (again.status_code, again.json()["code"]) == (409, "task_finished")
    for response in (
        served.client.get("/api/v1/tasks/nope"),
        served.client.get("/api/v1/tasks/nope/events"),
        served.client.post("/api/v1/tasks/nope/cancel"),
    ):
        assert (response.status_code, response.json()["code"]) == (404, "task_not_found")
    assert served.client.get("/api/v1/tasks", params={"state": "done"}).status_code == 400


def test_a_prompt_task_is_answered_by_the_model_never_run(data_dir: Path, tiny_gguf: Path) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    marker = data_dir.parent / "ran"
    with serving(data_dir) as server:
        task = server.client.post(
            "/api/v1/tasks", json={"text": f"touch {marker}", "model": "tiny", "limits": {"output_bytes": 64}}
        ).json()
        found = events(server.client, task["id"])
        with_file = server.client.post(
            "/api/v1/tasks", data={"text": "read it", "model": "tiny"}, files=[("attachment", ("a", b"1"))]
        )
        assert (with_file.status_code, with_file.json()["detail"]) == (
            400,
            "a prompt task takes no attachments",
        )
    ended = found[-1][1]
    assert ended["state"] == "succeeded", ended
    assert ended["result"]["reason"] == "answered"
    answer = printed(found).encode()
    assert 0 < len(answer) <= 64  # the output limit holds
    # The random model mostly talks past the limit, and is then cut; when it samples its end of
    # text first, nothing was cut.
    truncated = ended["result"]["truncated"]
    assert truncated["stderr"] is False
    assert not truncated["stdout"] or len(answer) > 60  # cut at the limit, on a character's boundary
    assert not marker.exists()


def test_a_server_killed_while_a_task_runs_retries_it_once_then_fails_it(data_dir: Path) -> None:
    script = {"mode": "script", "text": "echo attempt; sleep 120"}
    with serving(data_dir) as server:
        task = server.client.post("/api/v1/tasks", json=script).json()
        with server.client.stream("GET", f"/api/v1/tasks/{task['id']}/events", timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: output"):
                    break
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    with serving(data_dir) as server:
        with server.client.stream("GET", f"/api/v1/tasks/{task['id']}/events", timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: output"):
                    break
        again = server.client.get(f"/api/v1/tasks/{task['id']}").json()
        assert (again["state"], again["attempts"]) == ("running", 2)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    with serving(data_dir) as server:
        ended = events(server.client, task["id"])[-1][1]
    assert (ended["state"], ended["attempts"]) == ("failed", 2)
    assert ended["result"]["reason"] == "the server stopped while it ran"
    assert (data_dir / "tasks" / task["id"] / "stdout").read_text() == "attempt\n"


# A job with inference: the model list with curl, a chat with Python's urllib, an Ollama answer
# streamed, a route outside inference, a body past 10 MiB, and its environment.
INFERENCE_SCRIPT = r"""#!/bin/sh
curl -s "$INFERENCE_URL/models" > /work/models.json
curl -sN "$OLLAMA_BASE_URL/api/generate" \
  -d '{"model": "tiny", "prompt": "hi", "options": {"num_predict": 3}}' > /work/generate.jsonl
for route in "GET /api/v1/models" "POST /api/pull" "GET /api/v1/tasks"; do
  curl -s -o /dev/null -w "%{http_code}\n" -X "${route% *}" "$OLLAMA_BASE_URL${route#* }" >> /work/refused.txt
done
curl -s -X POST "$OLLAMA_BASE_URL/api/pull" > /work/refusal.json
env > /work/env.txt
/usr/bin/python3 - <<'PY'
import json, os, urllib.error, urllib.request
def post(body):
    request = urllib.request.Request(
        os.environ["INFERENCE_URL"] + "/chat/completions", data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
print(json.dumps({"chat": post(json.dumps(chat).encode()), "big": post(b" " * (11 * 1024 * 1024))}))
PY
"""


def test_a_job_with_inference_calls_the_model_as_its_task_and_only_that(
    data_dir: Path, tiny_gguf: Path, keys: Keys
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    user = {"Authorization": f"Bearer {keys.user}"}
    run_dir = data_dir.parent / "run"  # where the server makes each job's socket dir
    run_dir.mkdir(mode=0o711)
    env = {"OPENAI_API_KEY": "sk-not-for-jobs", "TMPDIR": str(run_dir)}
    with serving(data_dir, env=env) as server:
        created = server.client.post(
            "/api/v1/tasks",
            json={"mode": "script", "text": INFERENCE_SCRIPT, "inference": True},
            headers=user,
        )
        assert (created.status_code, created.json()["inference"]) == (201, True), created.text
        task_id = created.json()["id"]
        found = events(server.client, task_id, headers=user)
        without = server.client.post(
            "/api/v1/tasks",
            json={
                "mode": "script",
                "text": 'echo "[$INFERENCE_URL]"; curl -sS http://127.0.0.1:11434/api/tags',
            },
            headers=user,
        ).json()
        ended_without = events(server.client, without["id"], headers=user)
        admin = {"Authorization": f"Bearer {keys.admin}"}
        audit = server.client.get(
            "/api/v1/audit", params={"action": "task.inference", "limit": 100}, headers=admin
        ).json()
        logged = server.client.get("/api/v1/inference", headers=admin).json()
    assert found[-1][1]["state"] == "succeeded", (found[-1], printed(found, "stderr"))
    assert [path.name for path in run_dir.glob("appliance-inference-*")] == []  # gone with the job
    work = data_dir / "tasks" / task_id / "work"
    listed = json.loads((work / "models.json").read_text())["data"]
    assert [model["id"] for model in listed] == ["tiny:latest"]
    streamed = [json.loads(line) for line in (work / "generate.jsonl").read_text().splitlines()]
    assert len(streamed) > 1
    assert streamed[-1]["done"] is True
    assert (work / "refused.txt").read_text().split() == ["403", "403", "403"]
    refusal = json.loads((work / "refusal.json").read_text())["error"]
    assert "POST /api/pull is not an inference route" in refusal["message"]
    assert "POST /v1/chat/completions" in refusal["message"]
    answers = json.loads(printed(found))
    (chat_status, chat), (big_status, big) = answers["chat"], answers["big"]
    assert (chat_status, chat["object"]) == (200, "chat.completion")
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert big_status == 413
    assert "limit of 10485760 bytes" in big["error"]["message"]
    job_env = (work / "env.txt").read_text()
    assert "OLLAMA_BASE_URL=http://127.0.0.1:11434\n" in job_env
    assert "INFERENCE_URL=http://127.0.0.1:11434/v1\n" in job_env
    for secret in ("sk-not-for-jobs", keys.user, keys.admin, "APPLIANCE"):
        assert secret not in job_env
    # Without inference: no variables, and nothing listens on the port.
    assert printed(ended_without) == "[]\n"
    assert "Could not connect" in printed(ended_without, "stderr") or "Failed to connect" in printed(
        ended_without, "stderr"
    )
    assert ended_without[-1][1]["state"] == "failed"
    # The inference log ties each call to the task; every call is audited as the task, never
    # as the user's key.
    assert {(row["endpoint"], row["correlation_id"]) for row in logged} == {
        ("/api/generate", task_id),
        ("/v1/chat/completions", task_id),
    }
    by_task = [row for row in audit if row["target"] == task_id]
    assert {row["actor"] for row in by_task} == {f"task:{task_id}"}
    routes = {(row["detail"]["route"], row["detail"]["status"]) for row in by_task}
    assert {
        ("GET /v1/models", 200),
        ("POST /api/generate", 200),
        ("POST /v1/chat/completions", 200),
        ("GET /api/v1/models", 403),
        ("POST /api/pull", 403),
        ("POST /v1/chat/completions", 413),
    } <= routes


def test_the_forwarders_header_with_a_wrong_secret_is_refused(served: Serving) -> None:
    response = served.client.get(
        "/v1/models", headers={"X-Appliance-Forwarder": "guess", "X-Appliance-Task": "t"}
    )
    assert response.status_code == 403
    assert "x-appliance-forwarder" in response.json()["error"]["message"]
