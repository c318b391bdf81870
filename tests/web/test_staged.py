"""Serving while the app is being built: liveness at once, other requests answered once it exists,
a failure to build or start answered with 503 and the server stopped.

The app being built is a small ASGI app: what is tested is the stand-in in front of it, run by
the real uvicorn on loopback.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from appliance.web.staged import StagedApp


class Built:
    """The app ``build`` returns: answers "built" and records its lifespan."""

    def __init__(self, *, fail_startup: bool = False) -> None:
        self.fail_startup = fail_startup
        self.events: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if self.fail_startup:
                        await send({"type": "lifespan.startup.failed", "message": "the database is locked"})
                        return
                    self.events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": f"built app: {scope['path']}".encode()})


@contextmanager
def serving(build: Callable[[], Any]) -> Iterator[tuple[str, StagedApp, threading.Thread]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]

    def stop() -> None:
        server.should_exit = True

    staged = StagedApp(build, on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(staged, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", staged, thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def wait_for_liveness(url: str) -> httpx.Response:
    for _ in range(2000):
        try:
            return httpx.get(f"{url}/healthz", timeout=10)
        except httpx.TransportError:
            time.sleep(0.005)
    raise AssertionError("the server never answered /healthz")


def test_liveness_answers_while_the_app_is_built_and_an_early_request_gets_the_apps_answer() -> None:
    release = threading.Event()
    built = Built()

    def build() -> Built:
        release.wait(timeout=30)
        return built

    with serving(build) as (url, staged, _), ThreadPoolExecutor(1) as pool:
        liveness = wait_for_liveness(url)
        assert (liveness.status_code, liveness.json()) == (200, {"status": "ok"})
        early = pool.submit(httpx.get, f"{url}/v1/models", timeout=30)  # sent before the app exists
        while staged.waiting == 0 and not early.done():
            time.sleep(0.005)
        assert staged.waiting == 1  # held, not refused
        assert built.events == []
        release.set()
        answer = early.result()
        assert (answer.status_code, answer.text) == (200, "built app: /v1/models")
        assert built.events == ["startup"]  # the app's own lifespan ran before it served
        assert httpx.get(f"{url}/healthz").text == "built app: /healthz"  # the app's own from then on
        assert staged.error is None
    assert built.events == ["startup", "shutdown"]


@pytest.mark.parametrize(
    ("build_fails", "reason"),
    [(True, "RuntimeError: no module named llama_cpp"), (False, "the database is locked")],
    ids=["the build raises", "the app's startup fails"],
)
def test_an_app_that_cannot_be_built_or_started_is_answered_with_503_and_the_server_stops(
    build_fails: bool, reason: str
) -> None:
    release = threading.Event()

    def build() -> Built:
        release.wait(timeout=30)
        if build_fails:
            raise RuntimeError("no module named llama_cpp")
        return Built(fail_startup=True)

    with serving(build) as (url, staged, thread), ThreadPoolExecutor(1) as pool:
        wait_for_liveness(url)
        early = pool.submit(httpx.get, f"{url}/api/v1/models", timeout=30)
        while staged.waiting == 0 and not early.done():  # held by the server, not still on its way
            time.sleep(0.005)
        release.set()
        answer = early.result()
        assert answer.status_code == 503
        assert answer.json()["code"] == "not_ready"
        assert reason in answer.json()["detail"]
        thread.join(timeout=30)
        assert not thread.is_alive()  # it stopped by itself: `serve` then exits 1 with the reason
        assert staged.error == reason
