"""Fixtures for two servers on one PostgreSQL: the pair, a loopback origin for pulls."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fileserver import FileServer, serve_files
from tests.multiserver.servers import Pair, two_servers


@pytest.fixture
def files() -> Iterator[FileServer]:
    """The origin every pull reaches: a Range-capable file server that logs each request."""
    with serve_files() as server:
        yield server


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """Where both data dirs live: a folder anyone may search (0711), since as root the servers run
    task jobs as nobody, who must pass through it to the job's work dir."""
    path = Path(tempfile.mkdtemp(prefix="appliance-two-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pair(postgres_url: str, shared_root: Path) -> Iterator[Pair]:
    """Servers A and B on this test's own PostgreSQL schema; skips where no PostgreSQL is reachable."""
    with two_servers(postgres_url, shared_root) as servers:
        yield servers
    for name, server in zip("AB", servers.both, strict=True):  # shown when the test failed
        print(f"--- the end of server {name}'s output ---\n{''.join(server.output)[-4000:]}")
