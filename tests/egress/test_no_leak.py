"""Provider keys are used and never seen (REQ-MODELS-0002, 0119, 0120, 0125): with keys set through
the CLI and the API, and fake providers that echo every key they get back in answers and errors, no
key (nor the key that seals them) shows up in a response, a page, the server's log, the CLI's
output, the data dir (the database included), a sandbox job's environment or output, or anything a
worker is sent."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

from tests.conftest import APPLIANCE
from tests.egress.fakes import serve_fake_anthropic, serve_fake_openai
from tests.web.serving import serving
from tests.web.tasking import data_dir
from tests.web.test_secrets import _listable_paths

__all__ = ["data_dir"]  # the fixture this module uses from tasking (jobs run as nobody)

ASK = [{"role": "user", "content": "Say hello."}]
# A job inside the sandbox: its whole environment, then a chat through its inference proxy.
JOB = r"""env
cat /proc/self/environ | tr '\0' '\n'
curl -s "$INFERENCE_URL/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "leakyopenai/gpt-x", "messages": [{"role": "user", "content": "hi"}]}'
"""


def _task_output(client: httpx.Client, task_id: str) -> str:
    """The task's events to its end, as text (its output is in them)."""
    with client.stream("GET", f"/api/v1/tasks/{task_id}/events", timeout=120) as response:
        assert response.status_code == 200
        lines: list[str] = []
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data:") and lines[-2:-1] == ["event: end"]:
                break
    return "\n".join(lines)


def test_provider_keys_reach_the_providers_and_nowhere_else(data_dir: Path) -> None:
    openai_key = f"sk-leak-openai-{secrets.token_hex(12)}"
    anthropic_key = f"sk-ant-leak-{secrets.token_hex(12)}"
    wrong_key = f"sk-leak-wrong-{secrets.token_hex(12)}"
    sealing_key = Fernet.generate_key().decode()
    markers = [openai_key, anthropic_key, wrong_key, sealing_key]
    run_dir = data_dir.parent / "run"  # where the server makes each job's socket dir
    run_dir.mkdir(mode=0o711)
    env = {
        "APPLIANCE_EGRESS__ENCRYPTION_KEY": sealing_key,
        "APPLIANCE_CLUSTER__WORK_WAIT": "1",
        "TMPDIR": str(run_dir),
    }
    seen: list[str] = []

    def cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*APPLIANCE, "--data-dir", str(data_dir), *args],
            input=key,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=60,
            check=False,
        )
        seen.extend([done.stdout, done.stderr])
        return done

    with serve_fake_openai() as fake_openai, serve_fake_anthropic() as fake_anthropic:
        fake_openai.echo_key = fake_anthropic.echo_key = True
        fake_openai.require_key, fake_anthropic.require_key = openai_key, anthropic_key
        base = fake_openai.base_url
        assert cli("providers", "add", "leakyopenai", "--kind", "openai", "--base-url", base,
                   "--key-stdin", key=openai_key).returncode == 0  # fmt: skip
        # The same provider with a key it refuses: its 401 quotes the key back.
        assert cli("providers", "add", "wrongkey", "--kind", "openai", "--base-url", base,
                   "--key-stdin", key=wrong_key).returncode == 0  # fmt: skip
        assert cli("providers", "add", "leakyanthropic", "--kind", "anthropic", "--base-url",
                   fake_anthropic.base_url).returncode == 0  # fmt: skip
        allowed = '["leakyopenai", "leakyanthropic", "wrongkey"]'
        assert cli("prefs", "set", "model_routing.allowed_external_providers", allowed).returncode == 0

        with serving(data_dir, env=env) as server:
            client = server.client

            def keep(response: httpx.Response) -> httpx.Response:
                seen.append(response.text)
                seen.extend(f"{name}: {value}" for name, value in response.headers.items())
                return response

            # The anthropic key goes in through the API (write-only: the answer says only "set").
            changed = keep(client.patch("/api/v1/providers/leakyanthropic", json={"key": anthropic_key}))
            assert changed.status_code == 200
            assert changed.json()["key_set"] is True

            chat = {"model": "leakyopenai/gpt-x", "messages": ASK}
            answered = keep(client.post("/v1/chat/completions", json=chat))
            assert answered.status_code == 200, answered.text
            assert "[redacted]" in answered.json()["choices"][0]["message"]["content"]
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed:
                seen.append(streamed.read().decode())
            messages = {"model": "leakyanthropic/claude-x", "max_tokens": 64, "messages": ASK}
            assert keep(client.post("/v1/messages", json=messages)).status_code == 200
            with client.stream("POST", "/v1/messages", json={**messages, "stream": True}) as streamed:
                seen.append(streamed.read().decode())
            ollama = {"model": "leakyanthropic/claude-x", "messages": ASK, "stream": False}
            assert keep(client.post("/api/chat", json=ollama)).status_code == 200
            refused = keep(client.post("/v1/chat/completions", json={**chat, "model": "wrongkey/gpt-x"}))
            assert refused.status_code == 502, refused.text
            for name in ("leakyopenai", "leakyanthropic", "wrongkey"):
                keep(client.post(f"/api/v1/providers/{name}/test"))
                keep(client.get(f"/api/v1/providers/{name}"))

            # A sandbox job: its environment, and a chat through its proxy (answered, scrubbed).
            task = keep(
                client.post("/api/v1/tasks", json={"mode": "commands", "text": JOB, "inference": True})
            )
            assert task.status_code == 201, task.text
            job = _task_output(client, task.json()["id"])
            seen.append(job)
            assert "INFERENCE_URL=" in job, job[-2000:]
            assert "[redacted]" in job, job[-2000:]

            # A worker: what it is sent when it joins, heartbeats and asks for work.
            token = cli("nodes", "token", "create").stdout.strip()
            join = {"token": token, "name": "w1", "capabilities": {"cpu": {}}}
            joined = keep(client.post("/api/v1/cluster/join", json=join))
            assert joined.status_code == 201, joined.text
            worker = {"Authorization": f"Bearer {joined.json()['credential']}"}
            keep(client.post("/api/v1/cluster/heartbeat", json={}, headers=worker))
            keep(client.get("/api/v1/cluster/work", params={"wait": 0.1}, headers=worker))

            for path in _listable_paths(keep(client.get("/schema/openapi.json")).json()):
                keep(client.get(path))
            for path in ("/ui/app.js", "/api/v1/audit?limit=1000", "/api/v1/inference?limit=1000"):
                keep(client.get(path))
        seen.extend(server.output)
        cli("providers", "ls", "--json")
        cli("providers", "show", "leakyopenai")
        cli("providers", "test", "wrongkey")
        cli("audit", "--json")
        cli("db", "status")

        # The keys were really in use: each provider got its own.
        assert (
            fake_openai.received("/v1/chat/completions")[0].headers["authorization"] == f"Bearer {openai_key}"
        )
        assert any(
            r.headers.get("x-api-key") == anthropic_key for r in fake_anthropic.received("/v1/messages")
        )

    stored = b"".join(path.read_bytes() for path in data_dir.rglob("*") if path.is_file())
    for marker in markers:
        assert marker.encode() not in stored, marker
        for text in seen:
            assert marker not in text, (marker, _around(text, marker))


def _around(text: str, marker: str) -> Any:
    at = text.find(marker)
    return json.dumps(text[max(0, at - 300) : at + 300])
