"""Fixtures of the cluster's tests: the server's app run by the real uvicorn on a loopback port,
in this process, so a test can reach its work channel (on the server's own event loop) while
httpx plays the worker over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import warnings
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

from appliance.audit import Context
from appliance.cluster.channel import WorkChannel
from appliance.runtime import Runtime
from appliance.settings import ClusterSettings, ServerSettings, Settings
from appliance.web.app import create_app

T = TypeVar("T")


@dataclass
class Live:
    url: str
    runtime: Runtime
    loop: asyncio.AbstractEventLoop
    client: httpx.Client

    @property
    def channel(self) -> WorkChannel:
        assert self.runtime.channel is not None
        return self.runtime.channel

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coroutine`` on the server's event loop, where the channel lives."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def token(self, expires: str | None = None) -> str:
        return self.runtime.cluster.create_token(Context.cli(), expires=expires).token

    def join(self, name: str = "w1") -> Worker:
        answer = self.client.post(
            "/api/v1/cluster/join", json={"token": self.token(), "name": name, "capabilities": {"cpu": {}}}
        )
        assert answer.status_code == 201, answer.text
        body = answer.json()
        worker = Worker(body["node_id"], name, body["credential"], self.url)
        # As a worker does at once: a node that never heartbeated is unavailable, and the server's
        # sweep fails its work.
        assert worker.heartbeat(config_applied=body["config_version"]).status_code == 200
        return worker


@dataclass
class Worker:
    """What a worker holds after joining; ``client`` sends its credential."""

    node_id: str
    name: str
    credential: str
    url: str

    def client(self, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.credential}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def heartbeat(self, **report: Any) -> httpx.Response:
        with self.client() as client:
            return client.post("/api/v1/cluster/heartbeat", json=report)


def _listen() -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    return listener


@pytest.fixture
def live_server(data_dir: Path) -> Iterator[Any]:
    """``start(auth=..., **cluster settings)``: the app served on a free loopback port."""
    started: list[
        tuple[uvicorn.Server, threading.Thread, socket.socket, httpx.Client, asyncio.AbstractEventLoop]
    ] = []

    def start(auth: str = "auto", **cluster: Any) -> Live:
        listener = _listen()
        port = listener.getsockname()[1]
        settings = Settings(
            data_dir=data_dir,
            port=port,
            server=ServerSettings(auth=auth),  # type: ignore[arg-type]
            cluster=ClusterSettings(**cluster),
        )
        # Built in this process (the tests' filter makes warnings errors), Litestar warns about
        # handlers other modules declare.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=lambda: loop.run_until_complete(server.serve(sockets=[listener])), daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.02)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        started.append((server, thread, listener, client, loop))
        return Live(f"http://127.0.0.1:{port}", app.state.runtime, loop, client)

    yield start
    for server, thread, listener, client, loop in started:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
        loop.close()
