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
    output: list[str]  # what the server printed: the lines read so far, the rest when it stops
    process: subprocess.Popen[str]

    def line_with(self, text: str) -> str:
        """The first line the server prints with ``text`` in it (read while it runs)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if text in line:
                return line
        raise AssertionError(f"the server never printed {text!r}:\n{''.join(self.output)}")


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
    result = Serving(url, port, client, [], process)
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
