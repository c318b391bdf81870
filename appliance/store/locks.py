"""Named locks across processes: what keeps one pull of a ref running at a time.

``FileLocks`` are flock files in a directory, so they reach the processes of one machine: the
embedded SQLite store's case (the server and a CLI pull share a data dir). A store that several
machines share offers its own (``Store.shared_locks``: PostgreSQL's advisory locks).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

__all__ = ["FileLocks", "Locks", "lock_name"]


class Locks(Protocol):
    def hold(self, key: str, *, blocking: bool) -> AbstractContextManager[bool]:
        """The lock named ``key``, across every process these locks reach; yields whether it was
        taken (always True when blocking). Released when the block ends, or when the process dies."""
        ...


def lock_name(key: str) -> str:
    """A key's name on disk (also its partial download's): short, and safe whatever the key holds."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class FileLocks:
    """An flock on ``<directory>/<lock_name(key)>.lock`` per key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextmanager
    def hold(self, key: str, *, blocking: bool) -> Iterator[bool]:
        path = self.directory / f"{lock_name(key)}.lock"
        while True:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            except BaseException:
                os.close(fd)
                raise
            # gc removes a lock file nobody holds: between our open and our flock it may have removed
            # this one, and another process may hold a new file at the path. Ours would lock nothing.
            if _same_file(fd, path):
                break
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)
