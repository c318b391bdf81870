"""The data dir a test that runs tasks serves from: as root, jobs run as nobody, who must pass
through the folders above their work dir, so it sits under a folder anyone may search (0711)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["data_dir"]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    shared = Path(tempfile.mkdtemp(prefix="appliance-tasks-"))
    shared.chmod(0o711)
    yield shared / "data"
    shutil.rmtree(shared, ignore_errors=True)
