"""Fixtures shared by the pull tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.runtime import Runtime
from tests.fileserver import FileServer, serve_files
from tests.provision.test_pull import MIB, open_runtime
from tests.tiny_model import write_llama_gguf


@pytest.fixture
def files() -> Iterator[FileServer]:
    """A Range-capable file server with fault injection, on a free loopback port."""
    with serve_files() as server:
        yield server


@pytest.fixture
def runtime(data_dir: Path) -> Iterator[Runtime]:
    """A runtime whose pulls use 1 MiB parts over 4 connections (``open_runtime``)."""
    opened = open_runtime(data_dir)
    yield opened
    opened.close()


@pytest.fixture
def model_bytes(tmp_path: Path) -> bytes:
    """A loadable GGUF of about 6 MiB: several 1 MiB parts."""
    return write_llama_gguf(tmp_path / "served.gguf", padding_bytes=6 * MIB).read_bytes()
