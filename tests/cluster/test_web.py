"""The cluster's HTTP side against the real app on loopback, with httpx playing the worker: join,
credentials (auth on and off), heartbeats and config, the long-poll, answers streamed line by
line, leases, lost nodes, and blobs with Range."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.audit import Context
from appliance.cluster.channel import Work
from appliance.errors import NotReady
from tests.cluster.conftest import Live, Worker

FINISHED = {"type": "finished", "reason": "stop"}


def submit(live: Live, node_id: str, item: dict[str, Any]) -> Work:
    async def go() -> Work:
        return live.channel.submit(node_id, item)

    return live.call(go())


def next_event(live: Live, events: Any, timeout: float = 10) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        result: dict[str, Any] = await asyncio.wait_for(anext(events), timeout)
        return result

    return live.call(go(), timeout=timeout + 5)


def rest(live: Live, events: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        return [event async for event in events]

    return live.call(go())


def lines(*items: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# -- join and credentials ----------------------------------------------------------------------


def test_join_answers_a_credential_once_and_refuses_bad_tokens_and_taken_names(live_server: Any) -> None:
    live: Live = live_server()
    token = live.token()
    answer = live.client.post("/api/v1/cluster/join", json={"token": token, "name": "w1", "capabilities": {}})
    assert answer.status_code == 201
    body = answer.json()
    assert set(body) == {"node_id", "name", "credential", "heartbeat_interval", "config_version"}
    assert body["credential"].startswith("apnode_")
    taken = live.client.post("/api/v1/cluster/join", json={"token": token, "name": "w1"})
    assert (taken.status_code, taken.json()["code"]) == (409, "node_exists")
    wrong = live.client.post("/api/v1/cluster/join", json={"token": token[:-2] + "zz", "name": "w2"})
    assert (wrong.status_code, wrong.json()["code"]) == (401, "unauthorized")
    live.runtime.cluster.revoke_token(token.split(".")[2], Context.cli())
    revoked = live.client.post("/api/v1/cluster/join", json={"token": token, "name": "w2"})
    assert revoked.status_code == 401
    assert "revoked" in revoked.json()["detail"]
    bad = live.client.post("/api/v1/cluster/join", json={"token": token, "name": "no spaces"})
    assert bad.status_code == 400
    assert [n["name"] for n in live.client.get("/api/v1/nodes").json()] == ["w1"]


@pytest.mark.parametrize("auth", ["auto", "on"])
def test_node_routes_need_a_node_credential_whatever_auth_says(live_server: Any, auth: str) -> None:
    live: Live = live_server(auth=auth)
    worker = live.join()
    key = live.runtime.auth.create_key(Context.cli(), role="admin").key
    routes = [
        ("POST", "/api/v1/cluster/heartbeat", {}),
        ("GET", "/api/v1/cluster/work?wait=0", None),
        ("POST", "/api/v1/cluster/work/wnope/events", None),
        ("GET", "/api/v1/blobs/sha256:" + "0" * 64, None),
        ("HEAD", "/api/v1/blobs/sha256:" + "0" * 64, None),
    ]
    for method, path, body in routes:
        for headers in (
            {},
            {"Authorization": f"Bearer {key}"},
            {"Authorization": "Bearer apnode_" + "x" * 43},
        ):
            status = live.client.request(method, path, json=body, headers=headers).status_code
            assert status == 401, f"{method} {path} {headers}"
    with worker.client() as client:
        assert client.post("/api/v1/cluster/heartbeat", json={}).status_code == 200
        assert client.get("/api/v1/cluster/work?wait=0").json() == {"items": []}
        assert client.get("/api/v1/blobs/sha256:" + "0" * 64).status_code == 404


def test_a_node_credential_opens_no_admin_or_user_route(live_server: Any) -> None:
    live: Live = live_server(auth="on")
    worker = live.join()
    with worker.client() as client:
        for method, path in [
            ("GET", "/api/v1/nodes"),
            ("POST", "/api/v1/nodes/tokens"),
            ("GET", "/api/v1/models"),
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/api/v1/me"),
        ]:
            answer = client.request(method, path, json={} if method == "POST" else None)
            assert answer.status_code == 403, f"{method} {path}"
    denied = live.runtime.store.list_audit(action="auth.denied")
    assert denied
    assert denied[0].actor == f"node:{worker.node_id}"


def test_admin_routes_manage_tokens_and_nodes(live_server: Any, tiny_gguf: Path) -> None:
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    made = live.client.post("/api/v1/nodes/tokens", json={"expires": "1h"})
    assert made.status_code == 201
    assert made.json()["token"].startswith("apjoin1.-.")
    listed = live.client.get("/api/v1/nodes/tokens").json()
    assert [t["id"] for t in listed] == [made.json()["id"]]
    assert "token" not in listed[0]
    assert live.client.post("/api/v1/nodes/tokens", json={"expires": "soon"}).status_code == 400
    worker = live.join("w1")
    assert worker.heartbeat().status_code == 200
    shown = live.client.get("/api/v1/nodes/w1").json()
    assert (shown["id"], shown["state"]) == (worker.node_id, "ready")
    assert live.client.get("/api/v1/nodes/nope").json()["code"] == "node_not_found"
    assert live.client.post(f"/api/v1/nodes/{worker.node_id}/drain").json()["state"] == "draining"
    assert worker.heartbeat().json()["drained"] is True
    assert live.client.post("/api/v1/nodes/w1/undrain").json()["state"] == "ready"
    assigned = live.client.post("/api/v1/nodes/w1/models", json={"model": "tiny"})
    assert assigned.status_code == 202
    assert [m["model"] for m in assigned.json()["config"]["models"]] == ["tiny:latest"]
    assert live.client.post("/api/v1/nodes/w1/models", json={"model": "nope"}).status_code == 404
    unassigned = live.client.delete("/api/v1/nodes/w1/models/tiny:latest")
    assert unassigned.status_code == 200
    assert unassigned.json()["config"]["models"] == []
    revoked = live.client.delete(f"/api/v1/nodes/tokens/{made.json()['id']}")
    assert revoked.json()["state"] == "revoked"
    assert live.client.delete("/api/v1/nodes/tokens/nope").status_code == 404
    assert live.client.delete("/api/v1/nodes/w1").json()["name"] == "w1"
    assert worker.heartbeat().status_code == 401  # its credential is gone
    assert live.client.get("/api/v1/nodes").json() == []


# -- heartbeats, config, the long-poll ---------------------------------------------------------


def test_a_model_assigned_wakes_the_node_and_its_heartbeat_carries_the_newer_config(
    live_server: Any, tiny_gguf: Path
) -> None:
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    worker = live.join()
    first = worker.heartbeat(config_applied=None).json()
    applied = first["config_version"]
    assert worker.heartbeat(config_applied=applied).json()["config"] is None
    with worker.client() as client:
        client.get("/api/v1/cluster/work?wait=0")  # a wake-up for the first config, if any came
        poll = threading.Thread(target=lambda: found.append(client.get("/api/v1/cluster/work?wait=20")))
        found: list[httpx.Response] = []
        started = time.monotonic()
        poll.start()
        time.sleep(0.2)
        assert live.client.post("/api/v1/nodes/w1/models", json={"model": "tiny"}).status_code == 202
        poll.join(timeout=20)
    assert time.monotonic() - started < 5
    assert [item["kind"] for item in found[0].json()["items"]] == ["config"]
    reply = worker.heartbeat(
        config_applied=applied,
        capabilities={"memory_budget": 5},
        load={"active": 0, "queued": 0, "loaded": []},
        models=[{"digest": "sha256:" + "c" * 64, "model": "tiny:latest", "state": "loading", "reason": None}],
    ).json()
    assert reply["config_version"] > applied
    assert reply["config"]["models"][0]["model"] == "tiny:latest"
    shown = live.client.get("/api/v1/nodes/w1").json()
    assert shown["capabilities"] == {"memory_budget": 5}
    assert shown["models"][0]["state"] == "loading"
    bad = worker.heartbeat(models=[{"digest": "nope", "state": "loading"}])
    assert bad.status_code == 400


def test_a_poll_returns_as_soon_as_work_is_submitted_and_empty_after_its_wait(live_server: Any) -> None:
    live: Live = live_server(work_wait=1)
    worker = live.join()
    with worker.client() as client:
        started = time.monotonic()
        assert client.get("/api/v1/cluster/work?wait=25").json() == {"items": []}  # capped by work_wait
        assert 0.9 < time.monotonic() - started < 5
        found: list[httpx.Response] = []
        poll = threading.Thread(target=lambda: found.append(client.get("/api/v1/cluster/work?wait=20")))
        poll.start()
        time.sleep(0.2)
        work = submit(live, worker.node_id, {"kind": "generate", "spec": {}, "prompt": {}})
        poll.join(timeout=20)
        assert time.monotonic() - started < 5
    (item,) = found[0].json()["items"]
    assert item == {"kind": "generate", "spec": {}, "prompt": {}, "id": work.id, "lease_seconds": 30.0}


def test_work_is_not_handed_to_a_poll_whose_worker_went_away(live_server: Any) -> None:
    live: Live = live_server()
    worker = live.join()
    with worker.client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.get("/api/v1/cluster/work?wait=20")  # the worker gives up; its connection closes
    time.sleep(0.2)
    work = submit(live, worker.node_id, {"kind": "generate"})
    with worker.client() as client:
        items = client.get("/api/v1/cluster/work?wait=5").json()["items"]
    assert [item["id"] for item in items] == [work.id]


# -- answers -----------------------------------------------------------------------------------


def test_an_answer_reaches_the_waiter_line_by_line_before_its_body_ends(live_server: Any) -> None:
    live: Live = live_server()
    worker = live.join()
    work = submit(live, worker.node_id, {"kind": "generate"})
    with worker.client() as client:
        assert client.get("/api/v1/cluster/work?wait=5").json()["items"][0]["id"] == work.id
    release = threading.Event()

    def answer() -> Iterator[bytes]:
        yield lines({"type": "text", "text": "one"})
        release.wait(timeout=20)
        yield lines({"type": "text", "text": "two"}, FINISHED)

    done: list[httpx.Response] = []

    def post() -> None:
        with worker.client() as client:
            done.append(
                client.post(
                    f"/api/v1/cluster/work/{work.id}/events",
                    content=answer(),
                    headers={"Content-Type": "application/x-ndjson"},
                )
            )

    poster = threading.Thread(target=post)
    poster.start()
    events = work.events()
    assert next_event(live, events) == {"type": "text", "text": "one"}
    assert not done  # the body is still open
    release.set()
    poster.join(timeout=20)
    assert done[0].json() == {"state": "done"}
    assert rest(live, events) == [{"type": "text", "text": "two"}, FINISHED]
    with worker.client() as client:  # completion is idempotent
        again = client.post(f"/api/v1/cluster/work/{work.id}/events", content=lines(FINISHED))
        assert again.json() == {"state": "done", "duplicate": True}


def test_only_the_node_holding_the_lease_may_answer(live_server: Any) -> None:
    live: Live = live_server()
    holder, other = live.join("w1"), live.join("w2")
    work = submit(live, holder.node_id, {"kind": "generate"})
    with holder.client() as client:
        client.get("/api/v1/cluster/work?wait=5")
    with other.client() as client:
        refused = client.post(f"/api/v1/cluster/work/{work.id}/events", content=lines(FINISHED))
    assert (refused.status_code, refused.json()["code"]) == (409, "lease_lost")
    with holder.client() as client:
        assert (
            client.post(f"/api/v1/cluster/work/{work.id}/events", content=lines(FINISHED)).status_code == 200
        )
    assert rest(live, work.events()) == [FINISHED]


def test_work_not_started_within_its_lease_fails_naming_the_node(live_server: Any) -> None:
    live: Live = live_server(lease=0.3)
    worker = live.join()
    work = submit(live, worker.node_id, {"kind": "generate"})
    with worker.client() as client:
        assert len(client.get("/api/v1/cluster/work?wait=5").json()["items"]) == 1
    with pytest.raises(NotReady, match=f"node {worker.node_id} did not start it within its lease"):
        rest(live, work.events())
    with worker.client() as client:
        late = client.post(f"/api/v1/cluster/work/{work.id}/events", content=lines(FINISHED))
    assert late.status_code == 409


def test_a_node_that_misses_heartbeats_or_is_removed_fails_its_work(live_server: Any) -> None:
    live: Live = live_server(heartbeat_interval=0.2, heartbeat_timeout=1.5)
    silent, removed = live.join("w1"), live.join("w2")
    for worker in (silent, removed):  # w2 is removed well within its heartbeat timeout
        assert worker.heartbeat().status_code == 200
    lost = submit(live, silent.node_id, {"kind": "generate"})
    gone = submit(live, removed.node_id, {"kind": "generate"})
    assert live.client.delete("/api/v1/nodes/w2").status_code == 200
    with pytest.raises(NotReady, match="node w2 was removed"):
        rest(live, gone.events())
    started = time.monotonic()
    with pytest.raises(NotReady, match="node w1 missed its heartbeats"):
        rest(live, lost.events())
    assert time.monotonic() - started < 10
    assert live.client.get("/api/v1/nodes/w1").json()["state"] == "unavailable"


# -- blobs -------------------------------------------------------------------------------------


@pytest.fixture
def blob(live_server: Any, tiny_gguf: Path) -> tuple[Live, Worker, str, bytes]:
    live: Live = live_server()
    data = tiny_gguf.read_bytes()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    return live, live.join(), "sha256:" + hashlib.sha256(data).hexdigest(), data


def test_a_blob_is_served_whole_or_by_range(blob: tuple[Live, Worker, str, bytes]) -> None:
    _, worker, digest, data = blob
    size = len(data)
    with worker.client() as client:
        whole = client.get(f"/api/v1/blobs/{digest}")
        assert whole.status_code == 200
        assert whole.content == data
        assert whole.headers["content-length"] == str(size)
        assert whole.headers["etag"] == f'"{digest}"'
        assert whole.headers["accept-ranges"] == "bytes"
        for header, first, last in [
            ("bytes=10-19", 10, 19),
            ("bytes=100-", 100, size - 1),
            ("bytes=-5", size - 5, size - 1),
            (f"bytes=0-{size * 2}", 0, size - 1),
        ]:
            part = client.get(f"/api/v1/blobs/{digest}", headers={"Range": header})
            assert part.status_code == 206, header
            assert part.content == data[first : last + 1], header
            assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        for header in (f"bytes={size}-", "bytes=5-2", "bytes=0-1,4-5", "bytes=x-y", "lines=0-1"):
            refused = client.get(f"/api/v1/blobs/{digest}", headers={"Range": header})
            assert refused.status_code == 416, header
            assert refused.headers["content-range"] == f"bytes */{size}"
        head = client.head(f"/api/v1/blobs/{digest}")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == str(size)
        assert head.headers["etag"] == f'"{digest}"'
        assert client.head(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=0-9"}).status_code == 206
        assert client.get(f"/api/v1/blobs/{digest.upper().replace('SHA256', 'sha256')}").status_code == 200


def test_a_quarantined_absent_or_malformed_blob_is_refused(blob: tuple[Live, Worker, str, bytes]) -> None:
    live, worker, digest, _ = blob
    with worker.client() as client:
        assert client.get("/api/v1/blobs/sha256:" + "0" * 64).status_code == 404
        assert client.head("/api/v1/blobs/sha256:" + "0" * 64).status_code == 404
        for malformed in ("sha256:abc", "md5:" + "0" * 32, "nope"):
            assert client.get(f"/api/v1/blobs/{malformed}").status_code == 400, malformed
        live.runtime.store.mark_verified(digest, state="quarantined")
        answer = client.get(f"/api/v1/blobs/{digest}")
        assert (answer.status_code, answer.json()["code"]) == (404, "not_found")


def test_metrics_count_nodes_by_state_and_their_work(live_server: Any) -> None:
    live: Live = live_server(heartbeat_interval=0.2)
    ready = live.join("w1")
    live.runtime.cluster.join(live.token(), "w2", {}, Context.cli())  # never heartbeats
    submit(live, ready.node_id, {"kind": "generate"})
    submit(live, ready.node_id, {"kind": "generate"})
    wanted = ['appliance_nodes{state="ready"} 1.0', 'appliance_nodes{state="unavailable"} 1.0']
    wanted += ['appliance_node_work{node="w1"} 2.0', 'appliance_node_work{node="w2"} 0.0']
    deadline = time.monotonic() + 10
    while True:
        text = live.client.get("/metrics").text
        if all(line in text for line in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [line for line in wanted if line not in text] == []
    assert live.client.delete("/api/v1/nodes/w2").status_code == 200
    deadline = time.monotonic() + 10
    while 'node="w2"' in live.client.get("/metrics").text:  # a removed node leaves the gauge
        assert time.monotonic() < deadline
        time.sleep(0.1)
