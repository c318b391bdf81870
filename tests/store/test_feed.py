"""The change feed a live view waits on: a write wakes it at once, a quiet store lets it time out."""

from __future__ import annotations

import threading
import time

from appliance.store.base import Download, Store


def test_a_download_written_in_another_thread_wakes_a_waiter_at_once(store: Store) -> None:
    feed = store.change_feed()
    seen = feed.current("downloads")
    woke: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        feed.wait("downloads", seen, timeout=10)
        woke.append(time.monotonic() - started)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    store.create_download(Download(id="d1", ref="hf://a/b", state="queued", requested_by="t"))
    waiter.join(timeout=10)
    assert woke
    assert woke[0] < 5  # well before the 10 s timeout: the write woke it
    assert feed.current("downloads") != seen


def test_a_waiter_times_out_when_nothing_of_its_topic_changes(store: Store) -> None:
    feed = store.change_feed()
    seen = feed.current("tasks")
    store.set_preference("offline", True, actor="t")  # another topic
    started = time.monotonic()
    assert feed.wait("tasks", seen, timeout=0.3) == seen
    assert time.monotonic() - started >= 0.25
