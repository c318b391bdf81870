"""``appliance serve`` stops at once while workers hold their long-polls open (a poll waits up
to ``cluster.work_wait``; the server answers them with nothing as it begins to stop)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.conftest import Server


def test_serve_stops_without_waiting_out_a_workers_long_poll(server: Server) -> None:
    token = server.client.post("/api/v1/nodes/tokens", json={"expires": "1h"}).json()["token"]
    joined = server.client.post("/api/v1/cluster/join", json={"token": token, "name": "w1"})
    assert joined.status_code == 201, joined.text
    credential = joined.json()["credential"]
    answered: dict[str, Any] = {}

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as worker:
            reply = worker.get(
                "/api/v1/cluster/work",
                params={"wait": 30},
                headers={"Authorization": f"Bearer {credential}"},
            )
            answered.update(status=reply.status_code, body=reply.json(), at=time.monotonic())

    polling = threading.Thread(target=poll)
    polling.start()
    time.sleep(1)  # the poll is held open by now
    asked = time.monotonic()
    server.process.terminate()
    server.process.wait(timeout=15)  # not after the poll's 30 s (uvicorn re-raises the SIGTERM: -15)
    polling.join(timeout=15)
    assert answered["status"] == 200
    assert answered["body"] == {"items": []}
    assert answered["at"] - asked < 15
