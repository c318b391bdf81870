"""The inference forwarder on its own: a real Unix socket, a real loopback HTTP server behind it
and a real store for its audit. What a job sees end to end is in tests/web/test_tasks.py."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditService
from appliance.errors import NotReady
from appliance.settings import Settings
from appliance.store.base import Store
from appliance.store.factory import open_data_dir
from appliance.tasks import Job, Sandbox, sandbox
from appliance.tasks.forwarder import MAX_HEAD_BYTES, InferenceForwarder, JobAccess, local_forwarder
from appliance.tasks.sandbox import NOBODY
from tests.conftest import free_port


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.path} {self.headers.get('x-appliance-task')} {self.headers.get('authorization')}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self) -> None:
        """Echo the request's headers (lower-cased names) and body as JSON."""
        sent = self.rfile.read(int(self.headers.get("content-length", "0")))
        body = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": sent.decode()})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    # a short poll_interval: shutdown waits for serve_forever's next look
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    _, opened = open_data_dir(Settings(data_dir=tmp_path / "data"))
    yield opened
    opened.close()


def exchange(
    forwarder: InferenceForwarder, request: bytes, access: JobAccess | None = None
) -> tuple[bytes, Path]:
    """Send ``request`` through the task's socket; returns all that came back, and the socket's path."""

    async def run() -> tuple[bytes, Path]:
        async with forwarder.serving("t1", access) as path:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(request)
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer, path

    return asyncio.run(run())


def test_a_call_reaches_the_api_as_the_task_with_no_key_and_the_socket_goes_after(
    tmp_path: Path, store: Store, upstream: int
) -> None:
    forwarder = local_forwarder(Settings(data_dir=tmp_path, port=upstream), store)
    answer, path = exchange(
        forwarder, b"GET /api/tags?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer stolen\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in head
    assert b"/api/tags?x=1 t1 None" in body  # the job's Authorization header is dropped
    assert not path.exists()
    assert not path.parent.exists()
    (row,) = AuditService(store).list_events(action="task.inference")
    assert (row.actor, row.target, row.detail["status"]) == ("task:t1", "t1", 200)


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"GET /api/v1/models HTTP/1.1\r\n\r\n", b"403", b"not an inference route"),
        (
            b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"411",
            b"sent in chunks",
        ),
        (b"hello\r\n\r\n", b"400", b"not an HTTP/1.1 request"),
        (b"POST /api/chat HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400", b"is not a number"),
        (
            b"GET /api/tags HTTP/1.1\r\nX-Long: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
            b"431",
            b"headers pass",
        ),
    ],
)
def test_what_the_forwarder_refuses(
    tmp_path: Path, store: Store, upstream: int, request_bytes: bytes, status: bytes, message: bytes
) -> None:
    forwarder = local_forwarder(Settings(data_dir=tmp_path, port=upstream), store)
    answer, _ = exchange(forwarder, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert message in answer
    (row,) = AuditService(store).list_events(action="task.inference")
    assert (row.actor, row.outcome) == ("task:t1", "error")


def test_an_api_that_does_not_answer_gets_502(tmp_path: Path, store: Store) -> None:
    forwarder = local_forwarder(Settings(data_dir=tmp_path, port=free_port()), store)
    answer, _ = exchange(forwarder, b"GET /api/tags HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502")
    assert b"the appliance did not answer" in answer


@pytest.mark.parametrize(("inference", "wants"), [(True, "inference"), (False, "MCP tools")])
def test_a_job_with_inference_or_tools_needs_the_systems_python(
    shared_dir: Path, work_dir: Path, monkeypatch: pytest.MonkeyPatch, inference: bool, wants: str
) -> None:
    socket_path = shared_dir / "inference.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(socket_path))
        listening.listen()
        if os.geteuid() == 0:  # jobs then run as nobody, who must connect
            os.chown(socket_path, NOBODY, NOBODY)
        monkeypatch.setattr(sandbox, "RELAY_PYTHON", str(shared_dir / "no-python3"))
        job = Job(
            mode="script", text="true", work_dir=work_dir, inference_socket=socket_path, inference=inference
        )
        needs = rf"a job with {wants} needs .*no-python3, which runs its relay"
        with pytest.raises(NotReady, match=needs) as refused:
            Sandbox().run(job)
        assert f"without {wants}" in str(refused.value.hint)


MCP_CALL = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
MCP_REQUEST = (
    b"POST /mcp HTTP/1.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
    b"Mcp-Protocol-Version: 2025-06-18\r\nAuthorization: Bearer stolen\r\nX-Appliance-Job: forged\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(MCP_CALL), MCP_CALL)
)


def test_a_job_granted_no_tools_gets_403_on_mcp_audited(tmp_path: Path, store: Store, upstream: int) -> None:
    forwarder = local_forwarder(Settings(data_dir=tmp_path, port=upstream), store)
    answer, _ = exchange(forwarder, MCP_REQUEST)
    assert answer.startswith(b"HTTP/1.1 403")
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert "POST /mcp: this job's task was granted no MCP tools" in error["message"]
    assert "--tools" in error["hint"]
    (row,) = AuditService(store).list_events(action="task.inference")
    assert (row.actor, row.outcome, row.detail["route"], row.detail["status"]) == (
        "task:t1",
        "error",
        "POST /mcp",
        403,
    )


def test_a_granted_job_reaches_mcp_vouched_for_and_audited_by_the_gateway_alone(
    tmp_path: Path, store: Store, upstream: int
) -> None:
    forwarder = local_forwarder(Settings(data_dir=tmp_path, port=upstream), store)
    access = JobAccess(run_id="2", inference=False, tools=True)
    answer, _ = exchange(forwarder, MCP_REQUEST, access)
    assert answer.startswith(b"HTTP/1.1 200")
    chunked = answer.partition(b"\r\n\r\n")[2]
    echoed = json.loads(chunked.partition(b"\r\n")[2].rpartition(b"\r\n0\r\n")[0])
    headers = echoed["headers"]
    assert echoed["body"] == MCP_CALL.decode()
    assert (headers["x-appliance-task"], headers["x-appliance-run"], headers["x-appliance-job"]) == (
        "t1",
        "2",
        access.job_id,  # the forwarder's, never the job's own
    )
    assert forwarder.trusts(headers["x-appliance-forwarder"])
    assert headers["mcp-protocol-version"] == "2025-06-18"
    assert headers["accept"] == "application/json, text/event-stream"
    assert "authorization" not in headers
    assert AuditService(store).list_events(action="task.inference") == []
    # Tools without inference: the inference routes stay shut.
    refused, _ = exchange(forwarder, b"GET /api/tags HTTP/1.1\r\n\r\n", access)
    assert refused.startswith(b"HTTP/1.1 403")
    assert b"GET /api/tags: this job's task was not given inference" in refused
    other, _ = exchange(forwarder, b"GET /api/v1/models HTTP/1.1\r\n\r\n", access)
    assert b"GET /api/v1/models is not the MCP gateway: this job may call only" in other
    rows = AuditService(store).list_events(action="task.inference")
    assert sorted(row.detail["route"] for row in rows) == ["GET /api/tags", "GET /api/v1/models"]
