"""Beyond loopback: a LAN client with an API key, over TLS, trusting the server by fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent


def test_clients_with_a_key_chat_over_tls_with_a_server_bound_beyond_loopback(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    # 10.77.0.1 exists only inside the test's own network namespace (see tests/web/lan_serve.py).
    completed = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            "-m",
            "tests.web.lan_serve",
            str(tmp_path / "data"),
            str(tiny_gguf),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    # API keys turn on by themselves beyond loopback: with no admin, serve offers the setup token
    assert "one-time setup token" in report["without_admin"]
    assert report["no_key"] == 401
    assert report["openai_wrong_key"] == 401
    # the tiny model's random weights may end a reply early: a reply at all is what counts here
    assert 1 <= report["openai_tokens"] <= 8
    assert 1 <= report["ollama_tokens"] <= 8
