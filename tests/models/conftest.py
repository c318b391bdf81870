"""A small real filesystem to fill up."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs (the tests run as root in CI)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> None:
    # Unbuffered: a buffered file would keep the bytes that did not fit and raise ENOSPC again when
    # closed, depending on how the free space happens to divide into chunks.
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)  # short when nearly full; the next one raises ENOSPC
            except OSError:
                break
    finally:
        os.close(fd)
    stats = os.statvfs(disk)
    assert stats.f_bavail == 0
