"""The pull lock of a ref: one holder at a time, even when gc removes its file under a waiter."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from appliance.provision.downloads import DownloadRows, flight_key
from appliance.store.sqlite import SqliteStore
from tests.locks import flock_waited_on
from tests.provision.test_pull import wait_until

REF = "https://example.com/x.gguf"


def test_a_lock_file_removed_while_waiting_is_not_taken(tmp_path: Path) -> None:
    """A waiter that opened the lock file before gc removed it must not hold the old file's lock
    while another pull holds the new file at the path: two pulls of one ref would run at once."""
    store = SqliteStore(tmp_path / "appliance.db")
    rows = DownloadRows(store, tmp_path / "locks")
    path = tmp_path / "locks" / f"{flight_key(REF)}.lock"
    holding = threading.Event()
    with rows.lock(REF, blocking=True):
        waiter = threading.Thread(target=_hold, args=(rows, holding))
        waiter.start()
        wait_until(lambda: flock_waited_on(path), "the waiter blocks on the lock")
        os.unlink(path)  # what gc does to a lock file nobody holds
        newer = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # another process's pull of the ref
        fcntl.flock(newer, fcntl.LOCK_EX)
    try:
        wait_until(lambda: holding.is_set() or flock_waited_on(path), "the waiter takes a lock")
        assert not holding.is_set()  # it waits for the pull that holds the file now at the path
    finally:
        os.close(newer)
    waiter.join(timeout=30)
    assert holding.is_set()
    store.close()


def _hold(rows: DownloadRows, holding: threading.Event) -> None:
    with rows.lock(REF, blocking=True) as taken:
        assert taken
        holding.set()
