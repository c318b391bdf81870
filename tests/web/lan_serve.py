"""Run inside a network namespace (``unshare -n``) where 10.77.0.1 is a non-loopback address of
this host: make an admin, a key and a certificate, serve on 10.77.0.1 over TLS, and chat through
the ``openai`` and ``ollama`` clients as a LAN client would, trusting the server by the
fingerprint alone (as a join token carries it). Prints what happened as one JSON line.

Usage: python -m tests.web.lan_serve DATA_DIR MODEL_PATH
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from typing import Any

import httpx
import ollama
import openai

from appliance.errors import NotReady
from appliance.tls import fetch_pinned_ca
from tests.conftest import APPLIANCE, free_port

ADDRESS = "10.77.0.1"


def appliance(data_dir: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [*APPLIANCE, "--data-dir", data_dir, *args], input=stdin, capture_output=True, text=True, check=True
    )
    return done.stdout


def main(data_dir: str, model_path: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
    appliance(data_dir, "models", "import", model_path, "--name", "tiny")
    report: dict[str, Any] = {}
    port = free_port()
    # No admin yet: API keys are on beyond loopback, so serve offers the one-time setup token.
    plain_http = subprocess.Popen(
        [
            *APPLIANCE,
            "--data-dir",
            data_dir,
            "serve",
            "--host",
            ADDRESS,
            "--port",
            str(port),
            "--insecure-http",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert plain_http.stdout is not None
    console = []
    for line in plain_http.stdout:
        console.append(line)
        if "setup token" in line:
            break
    plain_http.terminate()
    plain_http.communicate(timeout=10)
    report["without_admin"] = "".join(console)
    appliance(
        data_dir, "users", "add", "root", "--role", "admin", "--password-stdin", stdin="a long passphrase\n"
    )
    key = appliance(data_dir, "keys", "create", "--user", "root").strip()
    made = appliance(data_dir, "tls", "init", "--names", ADDRESS)
    fingerprint = next(
        line.split(": ", 1)[1] for line in made.splitlines() if line.startswith("CA fingerprint")
    )
    server = subprocess.Popen(
        [*APPLIANCE, "--data-dir", data_dir, "serve", "--host", ADDRESS, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        trusted = _wait_and_trust(port, fingerprint, server)
        url = f"https://{ADDRESS}:{port}"
        with httpx.Client(verify=trusted) as http:
            report["no_key"] = http.get(f"{url}/api/v1/models").status_code
            compatible = openai.OpenAI(base_url=f"{url}/v1", api_key=key, http_client=http, max_retries=0)
            answer = compatible.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
            )
            report["openai_tokens"] = answer.usage.completion_tokens if answer.usage else None
            wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="apl_wrong", http_client=http, max_retries=0)
            try:
                wrong.models.list()
            except openai.AuthenticationError as refused:
                report["openai_wrong_key"] = refused.status_code
        with ollama.Client(host=url, verify=trusted, headers={"Authorization": f"Bearer {key}"}) as native:
            chatted = native.chat(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                options={"num_predict": 8, "temperature": 0},
            )
            report["ollama_tokens"] = chatted.eval_count
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(report))


def _wait_and_trust(port: int, fingerprint: str, server: subprocess.Popen[bytes]) -> ssl.SSLContext:
    """The CA fetched from the server itself and accepted by its fingerprint, once it listens."""
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"serve exited with status {server.returncode}")
        try:
            return ssl.create_default_context(cadata=fetch_pinned_ca(ADDRESS, port, fingerprint))
        except NotReady:  # not listening yet
            time.sleep(0.1)
    raise SystemExit("serve did not listen on time")


if __name__ == "__main__":
    main(*sys.argv[1:])
