"""Run inside a network namespace with only loopback (``unshare -n``): import a bundle into an
empty data dir, serve it, ask one chat completion, and print what happened as one JSON line.

Usage: python -m tests.bundles.offline_serve DATA_DIR BUNDLE MODEL
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from tests.conftest import APPLIANCE, free_port


def main(data_dir: str, bundle: str, model: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    interfaces = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    imported = subprocess.run(
        [*APPLIANCE, "--data-dir", data_dir, "bundle", "import", bundle, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if imported.returncode != 0:
        print(json.dumps({"import_error": imported.stderr}))
        return
    port = free_port()
    server = subprocess.Popen(
        [*APPLIANCE, "--data-dir", data_dir, "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=60,
        )
        print(
            json.dumps(
                {
                    "interfaces": [line.split(":")[1].strip() for line in interfaces.splitlines()],
                    "imported": json.loads(imported.stdout),
                    "status": answer.status_code,
                    "chat": answer.json(),
                }
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:4])
