"""The OpenAPI document tells the truth: schemathesis, every check (its default), against a live server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import APPLIANCE, free_port

CONFIG = Path(__file__).with_name("schemathesis.toml")
# Left out: the download events, which never end, and a task's, which last as long as the task.
# (No model is imported, so generation requests end at model_not_found; the server is offline, so
# pulls end at once.)
LEFT_OUT = r"^/api/v1/(downloads/events|tasks/\{task_id\}/events)$"


@pytest.fixture
def quiet_server(data_dir: Path, tmp_path: Path) -> Iterator[str]:
    """``appliance serve`` logging to a file: a thousand requests' access log would fill a pipe."""
    port = free_port()
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port)],
            stdout=log,
            stderr=log,
            env={**os.environ, "APPLIANCE_OFFLINE": "true"},  # generated refs never reach the network
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "appliance serve stopped"
            assert time.monotonic() < deadline, "appliance serve did not start"
            time.sleep(0.1)
        yield url
        process.terminate()
        process.wait(timeout=10)


def test_the_api_does_what_its_openapi_document_says(quiet_server: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG),
            "run",
            f"{quiet_server}/schema/openapi.json",
            "--max-examples",
            "10",
            "--seed",
            "1",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--exclude-path-regex",
            LEFT_OUT,
            "--continue-on-failure",
            "--no-color",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # its caches land there, not in the checkout
    )
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
