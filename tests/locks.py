"""Seeing who waits for an flock, so a test synchronises on it instead of sleeping."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["flock_waited_on", "wait_for_flock_waiter"]


def flock_waited_on(path: Path) -> bool:
    """Whether someone blocks on an flock of the file now at ``path`` (a "->" line in /proc/locks)."""
    inode = str(os.stat(path).st_ino)
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if fields[1:3] == ["->", "FLOCK"] and fields[6].rsplit(":", 1)[-1] == inode:
                return True
    return False


def wait_for_flock_waiter(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not flock_waited_on(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing waits for the lock on {path}")
        time.sleep(0.01)
