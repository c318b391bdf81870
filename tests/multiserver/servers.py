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
    data_dir.mkdir(parents=True)
    # A file, not a pipe: a server logs every request, and a pipe nobody reads while a test runs
    # fills up and stops the server mid-write.
    with (data_dir.parent / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
    return Serving(url, port, httpx.Client(base_url=url, timeout=60), [], process)


def _log(server: Serving, data_dir: Path) -> str:
    return (data_dir.parent / "serve.log").read_text(errors="replace")


def _wait_ready(server: Serving, data_dir: Path, deadline: float) -> None:
    while True:
        try:
            if server.client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            server.process.kill()
            server.process.wait()
            raise RuntimeError(f"appliance serve did not start:\n{_log(server, data_dir)}")
        time.sleep(0.1)


def _stop(server: Serving, data_dir: Path) -> None:
    """Stop the server; its output, for a failing test's report, is then in ``server.output``."""
    server.client.close()
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.output.append(_log(server, data_dir))


@contextmanager
def two_servers(database: str, root: Path, env: dict[str, str] | None = None) -> Iterator[Pair]:
    """Servers A and B on ``database``, their data dirs ``root/a/data`` and ``root/b/data``."""
    data_dirs = (root / "a" / "data", root / "b" / "data")
    with ExitStack() as stack:
        a = _spawn(data_dirs[0], ["--database", database], env or {})
        stack.callback(_stop, a, data_dirs[0])
        b = _spawn(data_dirs[1], [], {**(env or {}), "APPLIANCE_STORE__URL": database})
        stack.callback(_stop, b, data_dirs[1])
        deadline = time.monotonic() + START_SECONDS
        for server, data_dir in ((a, data_dirs[0]), (b, data_dirs[1])):
            _wait_ready(server, data_dir, deadline)
        yield Pair(a, b, database, data_dirs)
