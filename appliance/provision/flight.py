"""What a pull shares with the pulls of other processes and servers: the download slots, and
a cancel written to its row by any of them.

``DownloadSlots``: ``models.download.max_parallel`` downloads at once across every process the
locks reach, a lock per slot (``download-slot:<i>``). The locks are the store's shared ones where
several servers share it (PostgreSQL's advisory locks), else flock files in the data dir: a CLI
pull and the server of one data dir share one network link and one disk, so they share the slots
too. A pull that finds every slot taken looks again when a pull of this process gives its slot
back, or after SLOT_POLL (a slot of another process: trying one may open a database connection,
so it is not done at every change of the downloads), and stops waiting at a cancel.

``CancelWatch``: the pull runs on one server, its cancel may come from any (the API of another
server, or of the server a CLI pull shares its data dir with). A cancel there writes the row's
state; the watch reads the rows of this process's pulls every CANCEL_POLL and sets the cancel of a
pull whose row turned ``cancelled``. Its thread runs only while pulls do.

May import: errors, store.locks, store.base.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.errors import ApplianceError, DownloadCancelled
from appliance.store.base import Store
from appliance.store.locks import Locks

__all__ = ["CANCEL_POLL", "SLOT_POLL", "CancelWatch", "DownloadSlots"]

logger = logging.getLogger(__name__)

SLOT_POLL = 0.25  # seconds between looks at the slots, unless a pull of this process gives one back first
CANCEL_POLL = 0.25  # seconds between looks at the rows of this process's pulls, for a cancel


class DownloadSlots:
    def __init__(self, locks: Locks, count: int) -> None:
        self.locks = locks
        self.count = count
        self._released = threading.Condition()  # a slot held in this process was given back

    @contextmanager
    def hold(self, cancel: threading.Event) -> Iterator[int]:
        """Wait for a free slot and hold it for the block; yields its number. Raises
        DownloadCancelled when ``cancel`` is set while it waits."""
        while True:
            for slot in range(self.count):
                held = False
                try:
                    with self.locks.hold(f"download-slot:{slot}", blocking=False) as held:
                        if held:
                            yield slot
                            return
                finally:
                    if held:  # once the lock is given back, so a waiter of this process takes it
                        with self._released:
                            self._released.notify_all()
            with self._released:
                self._released.wait(SLOT_POLL)
            if cancel.is_set():
                raise DownloadCancelled("the download was cancelled while it waited for a download slot")


class CancelWatch:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._watched: dict[str, threading.Event] = {}  # download id -> its pull's cancel
        self._lock = threading.Lock()
        self._running = False
        self._closed = threading.Event()

    @contextmanager
    def watching(self, download_id: str, cancel: threading.Event) -> Iterator[None]:
        """Set ``cancel`` when the row turns ``cancelled`` (or disappears) during the block."""
        with self._lock:
            self._watched[download_id] = cancel
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="cancel-watch", daemon=True).start()
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(download_id, None)

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(CANCEL_POLL):
            with self._lock:
                if not self._watched:
                    self._running = False  # the next pull starts another thread
                    return
                watched = dict(self._watched)
            for download_id, cancel in watched.items():
                try:
                    row = self.store.get_download(download_id)
                except ApplianceError as exc:  # the store failed: the next round looks again
                    logger.warning("could not read download %s for a cancel: %s", download_id, exc)
                    continue
                if row is None or row.state == "cancelled":
                    cancel.set()
        with self._lock:
            self._running = False
