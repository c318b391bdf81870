"""Change feeds: counters that move when a write changes a topic's rows, so a live view (an SSE
stream, the task runner) wakes at once instead of polling on a fixed beat.

``LocalFeed`` counts this process's own writes; the SQLite store bumps it. A store several servers
share moves its counters on every server's writes too (PostgreSQL: LISTEN/NOTIFY). Either way a
caller keeps a slow poll as well: a SQLite file written by another process (a CLI pull) moves no
counter here.
"""

from __future__ import annotations

import threading
import time
from typing import Literal, Protocol, get_args

__all__ = ["TOPICS", "ChangeFeed", "LocalFeed", "Topic"]

Topic = Literal["downloads", "tasks", "preferences", "registry"]
TOPICS: tuple[Topic, ...] = get_args(Topic)


class ChangeFeed(Protocol):
    def current(self, topic: Topic) -> int:
        """The topic's counter now."""
        ...

    def wait(self, topic: Topic, seen: int, timeout: float) -> int:
        """Block until the topic's counter differs from ``seen``, or ``timeout`` seconds pass;
        returns the counter."""
        ...

    def close(self) -> None: ...


class LocalFeed:
    """Counters in this process, bumped by ``bump``; thread-safe."""

    def __init__(self) -> None:
        self._counters: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self._changed = threading.Condition()

    def bump(self, *topics: Topic) -> None:
        with self._changed:
            for topic in topics:
                self._counters[topic] += 1
            self._changed.notify_all()

    def current(self, topic: Topic) -> int:
        with self._changed:
            return self._counters[topic]

    def wait(self, topic: Topic, seen: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._counters[topic] == seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._counters[topic]

    def close(self) -> None:
        """Nothing to release; wakes every waiter so none outlives the store by its timeout."""
        with self._changed:
            self._changed.notify_all()
