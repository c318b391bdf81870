"""Pulls on two servers that share one PostgreSQL: one download for a ref however many servers ask
for it, and a pull on one server followed live on the other's download events."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.fileserver import Faults, FileServer
from tests.multiserver.servers import Pair, pulled, two_servers
from tests.provision.test_pull import digest_of
from tests.provision.test_pull_processes import wait_for
from tests.tiny_model import write_llama_gguf
from tests.web.serving import Serving

KIB = 1024


def model_file(tmp_path: Path, name: str, *, seed: int = 0) -> bytes:
    """A loadable GGUF under 1 MiB: one Range part, so each transfer is one body request."""
    content = write_llama_gguf(tmp_path / name, seed=seed, padding_bytes=400 * KIB).read_bytes()
    assert len(content) < 1024 * KIB
    return content


def blob(data_dir: Path, digest: str) -> Path:
    return data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


def pull(server: Serving, url: str, digest: str) -> httpx.Response:
    return server.client.post("/api/v1/models/pull", json={"ref": url, "digest": digest})


def test_eight_pulls_of_one_ref_across_two_servers_make_one_download(
    pair: Pair, files: FileServer, tmp_path: Path
) -> None:
    content = model_file(tmp_path, "shared.gguf")
    digest = digest_of(content)
    # about 1.5 s from the origin, so all eight ask while the first transfer runs
    url = files.add("/m/shared.gguf", content, Faults(bytes_per_second=len(content) * 2 // 3))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda server: pull(server, url, digest), [pair.a, pair.b] * 4))
    assert [answer.status_code in (200, 202) for answer in answers] == [True] * 8, [a.text for a in answers]

    # Each server ends with the blob in its own cache, verified.
    wait_for(lambda: all(blob(data_dir, digest).exists() for data_dir in pair.data_dirs), "both caches")
    for server, data_dir in zip(pair.both, pair.data_dirs, strict=True):
        again = pulled(server, url, digest)
        assert (again["downloaded"], again["digest"]) == (False, digest)
        assert Path(again["path"]) == blob(data_dir, digest)
        assert blob(data_dir, digest).read_bytes() == content

    # One download row, seen alike from both servers ...
    rows = [server.client.get("/api/v1/downloads").json() for server in pair.both]
    assert rows[0] == rows[1]
    assert [row["state"] for row in rows[0]] == ["done"], rows[0]
    (download,) = rows[0]
    assert (download["ref"], download["state"], download["bytes_done"]) == (url, "done", len(content))
    # ... and one transfer from the origin: the second server copies the blob from the first.
    assert len(files.body_requests("/m/shared.gguf")) == 1, files.hits_for("/m/shared.gguf")


def follow_downloads(server: Serving, ref: str, seen: list[tuple[float, dict[str, Any]]]) -> None:
    """Collect the server's download events, with when each arrived (epoch seconds, to compare with
    the rows' ``updated_at``), until ``ref``'s is done."""
    with server.client.stream("GET", "/api/v1/downloads/events", timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                row = json.loads(line.partition(":")[2])
                seen.append((time.time(), row))
                if (row["ref"], row["state"]) == (ref, "done"):
                    return


def test_a_pull_started_on_a_shows_live_on_bs_download_events(
    pair: Pair, files: FileServer, tmp_path: Path
) -> None:
    content = model_file(tmp_path, "watched.gguf")
    url = files.add("/m/watched.gguf", content, Faults(bytes_per_second=len(content) // 2))  # about 2 s
    seen: list[tuple[float, dict[str, Any]]] = []
    watcher = threading.Thread(target=follow_downloads, args=(pair.b, url, seen), daemon=True)
    watcher.start()
    time.sleep(0.5)  # B's stream is open before the pull starts

    answer = pull(pair.a, url, digest_of(content))
    assert answer.status_code in (200, 202), answer.text
    watcher.join(timeout=60)
    assert not watcher.is_alive(), f"B never showed the download done: {seen}"
    ended_on_b = seen[-1][0]
    finished = pair.a.client.get("/api/v1/downloads").json()[0]
    assert (finished["ref"], finished["state"]) == (url, "done")

    # B showed the transfer moving, not only its end: several progress values while it ran.
    moving = [row["bytes_done"] for _, row in seen if row["ref"] == url and row["state"] == "running"]
    assert len({done for done in moving if 0 < done < len(content)}) >= 2, moving
    first_progress = next(at for at, row in seen if row["ref"] == url and row["bytes_done"] > 0)
    assert ended_on_b - first_progress >= 0.5  # it ran about 2 s, and B saw it from early on


APPROVAL = "/api/v1/preferences/models.download.require_user_approval"


def test_a_pull_waiting_for_approval_on_b_is_approved_on_a_and_a_pull_on_a_is_cancelled_on_b(
    pair: Pair, files: FileServer, tmp_path: Path
) -> None:
    required = pair.a.client.put(APPROVAL, json={"value": True})
    assert required.status_code == 200, required.text
    content = model_file(tmp_path, "approved.gguf")
    url = files.add("/m/approved.gguf", content)
    waiting = pull(pair.b, url, digest_of(content))
    assert (waiting.status_code, waiting.json()["state"]) == (202, "pending"), waiting.text
    pending = pair.a.client.get("/api/v1/downloads", params={"state": "pending"}).json()
    assert [row["id"] for row in pending] == [waiting.json()["id"]]
    assert files.body_requests("/m/approved.gguf") == []  # nothing moves before an admin says so
    approved = pair.a.client.post(f"/api/v1/downloads/{waiting.json()['id']}/approve")
    assert (approved.status_code, approved.json()["state"]) == (200, "approved"), approved.text
    assert pulled(pair.b, url, digest_of(content))["digest"] == digest_of(content)

    # A pull running on A, cancelled through B's API.
    reset = pair.b.client.put(APPROVAL, json={"value": None})
    assert reset.status_code == 200, reset.text
    slow = model_file(tmp_path, "cancelled.gguf", seed=1)
    slow_url = files.add("/m/cancelled.gguf", slow, Faults(bytes_per_second=len(slow) // 20))  # about 20 s
    running = pull(pair.a, slow_url, digest_of(slow))
    assert running.status_code == 202, running.text
    row_url = f"/api/v1/downloads/{running.json()['id']}"
    wait_for(lambda: pair.a.client.get(row_url).json()["bytes_done"] > 0, "progress")
    cancelled = pair.b.client.delete(row_url)
    assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled"), cancelled.text
    # A stops the transfer (its progress stands still), and the model never arrives there.
    time.sleep(1.0)
    stopped = pair.a.client.get(row_url).json()
    time.sleep(1.0)
    assert pair.a.client.get(row_url).json() == stopped
    assert (stopped["state"], 0 < stopped["bytes_done"] < len(slow)) == ("cancelled", True), stopped
    assert pair.a.client.get("/api/v1/models/cancelled").status_code == 404
    assert not blob(pair.data_dirs[0], digest_of(slow)).exists()


def test_one_download_slot_holds_across_both_servers(
    postgres_url: str, shared_root: Path, files: FileServer, tmp_path: Path
) -> None:
    """``models.download.max_parallel`` 1 on both: a pull on B waits while A's runs, then runs."""
    contents = [model_file(tmp_path, f"slot-{n}.gguf", seed=n) for n in range(2)]
    urls = [
        files.add(f"/m/slot-{n}.gguf", content, Faults(bytes_per_second=len(content) // 2))  # about 2 s
        for n, content in enumerate(contents)
    ]
    with two_servers(postgres_url, shared_root, env={"APPLIANCE_MODELS__DOWNLOAD__MAX_PARALLEL": "1"}) as two:
        first = pull(two.a, urls[0], digest_of(contents[0]))
        assert first.status_code == 202, first.text
        wait_for(lambda: two.a.client.get("/api/v1/downloads").json()[0]["state"] == "running", "A's pull")
        second = pull(two.b, urls[1], digest_of(contents[1]))
        assert second.status_code == 202, second.text
        states: list[tuple[str, str]] = []

        def both_done() -> bool:
            rows = {row["ref"]: row["state"] for row in two.b.client.get("/api/v1/downloads").json()}
            states.append((rows[urls[0]], rows[urls[1]]))
            return states[-1] == ("done", "done")

        wait_for(both_done, "both pulls")
    assert ("running", "queued") in states  # B's pull waited for the slot A's held ...
    assert ("running", "running") not in states, states  # ... and never ran beside it
    assert ("done", "running") in states
