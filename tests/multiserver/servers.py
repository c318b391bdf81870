"""Two ``appliance serve`` processes on one PostgreSQL schema, each with a data dir (so a blob cache
and task files) of its own, as two servers behind a load balancer have.

Both start at once, so their migrations race as two servers started together do. Server A is told
the database with ``--database``, B through the environment (``APPLIANCE_STORE__URL``): both ways a
user has.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import APPLIANCE, free_port
from tests.web.serving import Serving

__all__ = ["Pair", "pulled", "two_servers"]

START_SECONDS = 60  # two servers start at once on a busy two-core machine


@dataclass
class Pair:
    a: Serving
    b: Serving
    database: str  # the shared schema's URL
    data_dirs: tuple[Path, Path]  # A's, B's

    @property
    def both(self) -> tuple[Serving, Serving]:
        return self.a, self.b


def pulled(server: Serving, url: str, digest: str, timeout: float = 60) -> dict[str, Any]:
    """Pull ``url`` on ``server`` until it is present there (a 202 means the pull goes on: asking
    again joins it); the 200's model."""
    deadline = time.monotonic() + timeout
    while True:
        answer = server.client.post("/api/v1/models/pull", json={"ref": url, "digest": digest})
        assert answer.status_code in (200, 202), answer.text
        if answer.status_code == 200:
            model: dict[str, Any] = answer.json()
            return model
        assert time.monotonic() < deadline, f"{url} is still not present on {server.url}: {answer.text}"
        time.sleep(0.2)


def _spawn(data_dir: Path, args: list[str], env: dict[str, str]) -> Serving:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    return Serving(url, port, httpx.Client(base_url=url, timeout=60), [], process)


def _wait_ready(server: Serving, deadline: float) -> None:
    while True:
        try:
            if server.client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            server.process.kill()
            raise RuntimeError(f"appliance serve did not start:\n{server.process.communicate()[0]}")
        time.sleep(0.1)


def _stop(server: Serving) -> None:
    server.client.close()
    server.process.terminate()
    try:
        out = server.process.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        server.process.kill()
        out = server.process.communicate()[0]
    server.output.append(out)


@contextmanager
def two_servers(database: str, root: Path, env: dict[str, str] | None = None) -> Iterator[Pair]:
    """Servers A and B on ``database``, their data dirs ``root/a/data`` and ``root/b/data``."""
    data_dirs = (root / "a" / "data", root / "b" / "data")
    with ExitStack() as stack:
        a = _spawn(data_dirs[0], ["--database", database], env or {})
        stack.callback(_stop, a)
        b = _spawn(data_dirs[1], [], {**(env or {}), "APPLIANCE_STORE__URL": database})
        stack.callback(_stop, b)
        deadline = time.monotonic() + START_SECONDS
        for server in (a, b):
            _wait_ready(server, deadline)
        yield Pair(a, b, database, data_dirs)
