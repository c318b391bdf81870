"""``appliance serve`` in its own process with the flags and environment a test chooses."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import APPLIANCE, free_port


@dataclass
class Serving:
    url: str
    port: int
    client: httpx.Client
    output: list[str]  # what the server printed, filled in when it stops


@contextmanager
def serving(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, https: bool = False, verify: Any = True
) -> Iterator[Serving]:
    port = free_port()
    url = f"{'https' if https else 'http'}://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30, verify=verify)
    process = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            client.close()
            raise RuntimeError(f"appliance serve did not start:\n{process.communicate()[0]}")
        time.sleep(0.1)
    result = Serving(url, port, client, [])
    try:
        yield result
    finally:
        client.close()
        process.terminate()
        try:
            out = process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            out = process.communicate()[0]
        result.output.append(out)
