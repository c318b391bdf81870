"""The inference forwarder: a Unix socket per job that passes the job's inference calls to the appliance.

A job given inference (``NewTask.inference``) or MCP tools (``NewTask.tools``) gets a socket
bind-mounted at ``/run/appliance/inference.sock``; the relay inside its sandbox (``relay.py``) puts
it on the job's own 127.0.0.1:11434. Each connection carries one HTTP/1.1 exchange, checked here:

- only the routes its ``JobAccess`` opens: the inference routes (``INFERENCE_ROUTES``) for a job
  given inference, the MCP gateway (``MCP_PATH``) for a job granted tools; anything else gets 403
  with the routes allowed;
- a body of at most ``MAX_BODY_BYTES`` (413 past it) sent with a Content-Length (411 without);
- ``EXCHANGE_SECONDS`` for the whole exchange, the answer included (504 if nothing was answered yet).

It is then sent upstream: the job's own headers are dropped but for the body's type, and the
forwarder adds the task's id (``TASK_HEADER``), its run and the job's id (``RUN_HEADER``,
``JOB_HEADER``) with what vouches for them, from which the auth guard makes the actor ``task:<id>``
and the gateway's ``TaskScope`` (``X-Request-ID`` is the task's id too, so the inference log ties
each request to it). An MCP call keeps its protocol headers too. The answer streams back as it
comes, chunked.

- The server's own forwarder (``local_forwarder``) sends to the appliance's API on loopback with
  its per-process secret (``FORWARDER_HEADER``), and audits each inference exchange, and each
  one it refuses, as ``task.inference`` (the gateway audits the MCP calls it passes, as ``mcp.call``).
- A worker's (``credential`` given) sends to its server with the node's credential: the server
  takes it for the task only while the task is leased to that node, and audits it there.

The socket lives in a directory of its own, made for the job and removed with it.

Imports: the standard library, httpx, audit, identity, settings, the client's trust of the
server's certificate and this package's sandbox (the job's user).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import httpx

from appliance.audit import AuditNote, Context, record
from appliance.client import _data_dir_trust
from appliance.identity import Actor
from appliance.settings import Settings, url_host
from appliance.store.base import Store
from appliance.tasks.sandbox import NOBODY

__all__ = [
    "EXCHANGE_SECONDS",
    "FORWARDER_HEADER",
    "INFERENCE_ROUTES",
    "JOB_HEADER",
    "MAX_BODY_BYTES",
    "MCP_PATH",
    "MCP_ROUTES",
    "RUN_HEADER",
    "TASK_HEADER",
    "InferenceForwarder",
    "JobAccess",
    "local_forwarder",
    "task_actor",
]

INFERENCE_ROUTES = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/embed"),
        ("POST", "/api/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/api/tags"),
    }
)
MAX_BODY_BYTES = 10 * 1024 * 1024
EXCHANGE_SECONDS = 120.0
FINISH_SECONDS = 5.0  # for an exchange to end once its job has
MAX_HEAD_BYTES = 64 * 1024
FORWARDER_HEADER = "x-appliance-forwarder"
TASK_HEADER = "x-appliance-task"
RUN_HEADER = "x-appliance-run"  # the job's run (the task's attempt), vouched for like TASK_HEADER
JOB_HEADER = "x-appliance-job"  # the job's id, made by the forwarder when the job starts
MCP_PATH = "/mcp"  # reachable through the forwarder only for a job whose task was granted tools
MCP_ROUTES = frozenset({("POST", MCP_PATH), ("GET", MCP_PATH), ("DELETE", MCP_PATH)})
MCP_URL = "http://127.0.0.1:11434" + MCP_PATH  # the gateway as the job reaches it, through its relay
PASSED_HEADERS = ("content-type", "accept")  # the job's headers that reach the API; no credentials
# An MCP call's own protocol headers pass too (the session's, though the gateway keeps none).
MCP_HEADERS = ("mcp-protocol-version", "mcp-session-id", "last-event-id")
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
SOCKET_NAME = "inference.sock"


def task_actor(task_id: str) -> Actor:
    """Who a job's inference calls act as: its task, with a user's rights (the routes are inference only)."""
    return Actor(id=task_id, kind="task", role="user")


@dataclass(frozen=True)
class JobAccess:
    """What one job's socket carries: the inference routes, the MCP gateway, or both; and the ids
    its calls are vouched with (the run is the task's attempt; the job's id is made here, anew for
    each job started)."""

    run_id: str = "1"
    inference: bool = True
    tools: bool = False
    job_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def env(self, task_id: str) -> dict[str, str]:
        """The job's variables: its task's id; for a job granted tools, ``MCP_URL`` and the run's
        and job's ids too, which its MCP calls send back (``_meta``)."""
        if not self.tools:
            return {"TASK_ID": task_id}
        return {"TASK_ID": task_id, "RUN_ID": self.run_id, "JOB_ID": self.job_id, "MCP_URL": MCP_URL}

    def routes(self) -> frozenset[tuple[str, str]]:
        return (INFERENCE_ROUTES if self.inference else frozenset()) | (
            MCP_ROUTES if self.tools else frozenset()
        )


class _Refused(Exception):
    """A request answered here; ``unread`` is how much of its body is still to be read."""

    def __init__(self, status: HTTPStatus, message: str, hint: str, *, unread: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.hint = hint
        self.unread = unread


def local_forwarder(settings: Settings, store: Store) -> InferenceForwarder:
    """The server's forwarder: to its own API on loopback, audited here."""
    host = settings.host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    trust = _data_dir_trust(settings)
    upstream = f"{'http' if trust is None else 'https'}://{url_host(host)}:{settings.port}"
    return InferenceForwarder(upstream, verify=trust if trust is not None else True, store=store)


class InferenceForwarder:
    """Serves jobs' inference sockets on the running event loop; ``serving(task_id)`` gives one.
    Calls go to ``upstream``, vouched for by this process's secret, or by ``credential`` (a
    worker's node credential) when given; with a ``store``, each exchange is audited here."""

    def __init__(
        self,
        upstream: str,
        *,
        verify: ssl.SSLContext | bool = True,
        store: Store | None = None,
        credential: str | None = None,
    ) -> None:
        self.store = store
        self._secret = secrets.token_urlsafe(32)
        self._credential = credential
        self._upstream = upstream
        self._verify = verify
        self._as_nobody = os.geteuid() == 0  # jobs then run as nobody, who must connect

    def _vouching(self, task_id: str, access: JobAccess) -> dict[str, str]:
        ids = {TASK_HEADER: task_id, RUN_HEADER: access.run_id, JOB_HEADER: access.job_id}
        if self._credential is not None:
            return {"authorization": f"Bearer {self._credential}", **ids}
        return {FORWARDER_HEADER: self._secret, **ids}

    def trusts(self, secret: str) -> bool:
        """Whether a request's forwarder header is this process's secret."""
        return hmac.compare_digest(secret.encode(), self._secret.encode())

    @asynccontextmanager
    async def serving(self, task_id: str, access: JobAccess | None = None) -> AsyncIterator[Path]:
        """A socket for the task's job, served until the block ends; then it and its dir go.
        ``access`` says what it carries (the default: inference alone, on the first run)."""
        access = access if access is not None else JobAccess()
        directory = Path(tempfile.mkdtemp(prefix="appliance-inference-"))
        path = directory / SOCKET_NAME
        exchanges: set[asyncio.Task[None]] = set()
        # The exchange's own deadline bounds each call; httpx's would cut a long stream short.
        client = httpx.AsyncClient(
            base_url=self._upstream, verify=self._verify, timeout=httpx.Timeout(EXCHANGE_SECONDS)
        )

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            current = asyncio.current_task()
            assert current is not None
            exchanges.add(current)
            try:
                await self._exchange(client, task_id, access, reader, writer)
            finally:
                exchanges.discard(current)
                writer.close()
                with suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()

        try:
            server = await asyncio.start_unix_server(handle, path=str(path), limit=MAX_HEAD_BYTES)
            if self._as_nobody:
                directory.chmod(0o711)
                os.chown(path, NOBODY, NOBODY)
            path.chmod(0o600)
            try:
                yield path
            finally:
                server.close()
                if exchanges:
                    # The job has ended, so its connections are closed and each exchange ends at
                    # once, audited, before the task does; one still stuck after that is stopped.
                    _, stuck = await asyncio.wait(set(exchanges), timeout=FINISH_SECONDS)
                    for exchange in stuck:
                        exchange.cancel()
                await server.wait_closed()
        finally:
            await client.aclose()
            shutil.rmtree(directory, ignore_errors=True)

    async def _exchange(
        self,
        client: httpx.AsyncClient,
        task_id: str,
        access: JobAccess,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        note = AuditNote(target=task_id)
        started = time.monotonic()
        answered = False
        audit = True
        try:
            async with asyncio.timeout(EXCHANGE_SECONDS):
                method, target, headers, body = await _read_request(reader, note, access.routes())
                note.bytes = len(body)
                mcp = (method, target.partition("?")[0]) in MCP_ROUTES
                audit = not mcp  # the gateway audits each MCP call itself (mcp.call)
                passed = (*PASSED_HEADERS, *MCP_HEADERS) if mcp else PASSED_HEADERS
                request = client.build_request(
                    method,
                    target,
                    content=body,
                    headers={
                        **{name: headers[name] for name in passed if name in headers},
                        **self._vouching(task_id, access),
                        "x-request-id": task_id,
                    },
                )
                response = await client.send(request, stream=True)
                try:
                    answered = True
                    note.detail.update(status=response.status_code)
                    note.outcome = "ok" if response.is_success else "error"
                    writer.write(_head(response.status_code, response.headers.multi_items()))
                    async for chunk in response.aiter_raw():
                        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                finally:
                    await response.aclose()
        except _Refused as refused:
            note.outcome = "error"
            note.detail.update(status=refused.status.value, message=str(refused))
            _answer(writer, refused.status, str(refused), refused.hint)
            # Read the body the job still sends, so that its end reads the answer, not a reset.
            with suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                async with asyncio.timeout(EXCHANGE_SECONDS):
                    while refused.unread > 0:
                        refused.unread -= len(await reader.readexactly(min(refused.unread, 65536)))
        except TimeoutError:
            note.outcome = "error"
            note.detail.update(message=f"stopped after {EXCHANGE_SECONDS:g} s")
            if not answered:
                _answer(
                    writer,
                    HTTPStatus.GATEWAY_TIMEOUT,
                    f"the inference call took longer than {EXCHANGE_SECONDS:g} s",
                    "ask for fewer tokens, or split the work into shorter calls",
                )
        except httpx.HTTPError as exc:
            note.outcome = "error"
            note.detail.update(message=str(exc))
            if not answered:
                _answer(writer, HTTPStatus.BAD_GATEWAY, f"the appliance did not answer: {exc}", "try again")
        except (ConnectionError, asyncio.IncompleteReadError):
            note.outcome = "error"
            note.detail.update(message="the job hung up")
        finally:
            # Recorded even when the exchange is stopped (a record started runs to its end in its thread).
            if self.store is not None and audit:
                await asyncio.to_thread(
                    record,
                    self.store,
                    Context(task_actor(task_id), correlation_id=task_id),
                    action="task.inference",
                    note=note,
                    duration_ms=round((time.monotonic() - started) * 1000),
                )
        with suppress(ConnectionError):
            await writer.drain()


async def _read_request(
    reader: asyncio.StreamReader, note: AuditNote, routes: frozenset[tuple[str, str]]
) -> tuple[str, str, dict[str, str], bytes]:
    """Method, target, headers (lower-cased names) and body of one request to one of ``routes``,
    or _Refused; the route goes in ``note`` as soon as it is known."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _Refused(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"the request's headers pass {MAX_HEAD_BYTES} bytes",
            "send fewer or shorter headers",
        ) from None
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(HTTPStatus.BAD_REQUEST, "not an HTTP/1.1 request", "send an HTTP/1.1 request")
    method, target, _ = parts
    note.detail.update(route=f"{method} {target.partition('?')[0]}")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _Refused(
            HTTPStatus.LENGTH_REQUIRED,
            "the request's body is sent in chunks",
            "send the body whole, with a Content-Length header",
        )
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _Refused(
            HTTPStatus.BAD_REQUEST, f"Content-Length {length_text!r} is not a number", "send the body's size"
        )
    length = int(length_text)
    route = (method, target.partition("?")[0])
    if route not in routes:
        raise _Refused(HTTPStatus.FORBIDDEN, *_not_allowed(route, routes), unread=length)
    if length > MAX_BODY_BYTES:
        raise _Refused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request's body of {length} bytes passes the limit of {MAX_BODY_BYTES} bytes "
            "for a job's inference call",
            "send a smaller request",
            unread=length,
        )
    return method, target, headers, await reader.readexactly(length)


def _not_allowed(route: tuple[str, str], routes: frozenset[tuple[str, str]]) -> tuple[str, str]:
    """Why a job may not call ``route``, and what it may call instead."""
    called = f"{route[0]} {route[1]}"
    allowed = ", ".join(f"{verb} {path}" for verb, path in sorted(routes, key=lambda r: (r[1], r[0])))
    if route in MCP_ROUTES:
        why = f"{called}: this job's task was granted no MCP tools"
        if routes:
            why += f"; it may call only {allowed}"
        return why, "create the task with the tools its job calls (--tools, the API's tools)"
    if route in INFERENCE_ROUTES:
        return (
            f"{called}: this job's task was not given inference; it may call only {allowed}",
            "create the task with inference (--inference) to call models",
        )
    if not routes & INFERENCE_ROUTES:
        return f"{called} is not the MCP gateway: this job may call only {allowed}", "call $MCP_URL"
    return (
        f"{called} is not an inference route: a job may call only {allowed}",
        "call one of those routes at $INFERENCE_URL (OpenAI) or $OLLAMA_BASE_URL (Ollama)"
        + (", or the MCP gateway at $MCP_URL" if routes >= MCP_ROUTES else ""),
    )


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in HOP_HEADERS]
    lines += ["Transfer-Encoding: chunked", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _answer(writer: asyncio.StreamWriter, status: HTTPStatus, message: str, hint: str) -> None:
    body = json.dumps({"error": {"message": message, "hint": hint, "status": status.value}}).encode()
    writer.write(
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
