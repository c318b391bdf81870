"""Serving while the app is still being built.

``appliance serve`` binds its port first and builds the app in a thread: importing Litestar, the
routes, the store and the engine takes about a second on a small machine. Until the app exists,
``/healthz`` (liveness: the process answers) is answered at once and every other request waits
for the app and then goes to it, so a client that connects early gets its answer, only later.
The app's own lifespan (opening the runtime) runs as soon as it is built; a failure to build or
to start is answered with 503 and stops the server, which then exits 1 with the reason.

Imports the standard library only: it runs before everything else has loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["StagedApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("appliance.serve")

LIVENESS_PATH = "/healthz"


class StagedApp:
    """An ASGI app standing in for the one ``build`` returns (run in a thread) until it exists."""

    def __init__(self, build: Callable[[], ASGIApp], *, on_failure: Callable[[], None]) -> None:
        self._build = build
        self._on_failure = on_failure  # asks the server to stop
        self._app: ASGIApp | None = None
        self._ready: asyncio.Event | None = None  # made on the server's loop
        self._inner_receive: asyncio.Queue[Message] = asyncio.Queue()
        self._inner_send: asyncio.Queue[Message] = asyncio.Queue()
        self._inner_lifespan: asyncio.Task[None] | None = None
        self.error: str | None = None  # why the app could not be built or started
        self.waiting = 0  # requests held until the app exists

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self._app is None:
            if scope["type"] == "http" and scope["path"] == LIVENESS_PATH:
                await _answer(send, 200, {"status": "ok"})
                return
            assert self._ready is not None  # the lifespan ran before any request
            self.waiting += 1
            try:
                await self._ready.wait()
            finally:
                self.waiting -= 1
            if self._app is None:
                if scope["type"] == "http":
                    body = {
                        "status": 503,
                        "code": "not_ready",
                        "detail": f"the server failed to start: {self.error}",
                        "hint": "read the server's log for the cause, fix it and start the server again",
                    }
                    await _answer(send, 503, body)
                return
        await self._app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup: answered at once, the app comes later
        self._ready = asyncio.Event()
        starting = asyncio.create_task(self._start(dict(scope)))
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await starting  # a build in its thread cannot be cut short
        if self._inner_lifespan is not None:
            if self._app is not None:
                self._inner_receive.put_nowait({"type": "lifespan.shutdown"})
                reply = await self._inner_send.get()
                if reply["type"] == "lifespan.shutdown.failed":
                    log.error("the app failed to shut down: %s", reply.get("message", ""))
            else:  # its startup failed: it has nothing to shut down
                self._inner_lifespan.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._inner_lifespan
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self, scope: Scope) -> None:
        assert self._ready is not None
        try:
            app = await asyncio.to_thread(self._build)
        except Exception as exc:
            log.exception("the app could not be built")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        self._inner_lifespan = asyncio.create_task(
            app(scope, self._inner_receive.get, self._inner_send.put)  # type: ignore[arg-type]
        )
        self._inner_receive.put_nowait({"type": "lifespan.startup"})
        reply = await self._inner_send.get()
        if reply["type"] != "lifespan.startup.complete":
            self._fail(str(reply.get("message") or "its startup failed"))
            return
        self._app = app
        self._ready.set()

    def stopping(self) -> None:
        """The server begins to stop: the app ends the requests it holds open by design (a
        worker's long-poll), which the server would otherwise wait out before it exits."""
        state = getattr(self._app, "state", None)
        on_stopping = getattr(state, "on_stopping", None) if state is not None else None
        if callable(on_stopping):
            on_stopping()

    def _fail(self, reason: str) -> None:
        assert self._ready is not None
        self.error = reason
        self._ready.set()  # the waiting requests get 503
        self._on_failure()


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    content = json.dumps(body, separators=(",", ":")).encode()  # as compact as the app's own
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
