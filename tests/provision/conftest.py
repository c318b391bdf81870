"""Fixtures shared by the pull tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fileserver import FileServer, serve_files


@pytest.fixture
def files() -> Iterator[FileServer]:
    """A Range-capable file server with fault injection, on a free loopback port."""
    with serve_files() as server:
        yield server
