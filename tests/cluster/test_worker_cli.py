"""``appliance worker join/run``: what it refuses, and how it says so (real subprocesses).

The server here is a stand-in on loopback (TLS with a CA from ``tls init``, or plain HTTP) that
answers the join route as the contract says a server refuses it; the end-to-end tests with a
real ``appliance serve`` are in test_agent_e2e.py.
"""

from __future__ import annotations

import json
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.cluster.agent import WorkerConfig
from appliance.cluster.tokens import JoinTokenText
from appliance.settings import Settings
from appliance.tls import ca_fingerprint, init_tls

SECRET = "NeverPrinted_" + "s" * 30  # as secrets.token_urlsafe(32) makes them: 43 characters


class StandIn:
    """Answers POST /api/v1/cluster/join with ``status`` and a problem body; records the bodies."""

    def __init__(self, status: int, detail: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.detail = detail
        self.bodies: list[dict[str, Any]] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                standin.bodies.append({"path": self.path, **json.loads(body)})
                answer = json.dumps({"status": standin.status, "detail": standin.detail}).encode()
                self.send_response(standin.status)
                self.send_header("Content-Type", "application/problem+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"


@contextmanager
def standin(status: int, detail: str, *, tls: ssl.SSLContext | None = None) -> Iterator[StandIn]:
    server = StandIn(status, detail, tls=tls)
    # a short poll_interval: shutdown waits for serve_forever's next look
    thread = threading.Thread(target=server.httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def server_tls(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate from ``tls init``, and its CA's fingerprint."""
    files = init_tls(Settings(data_dir=tmp_path / "server"), [])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server.cert, files.server.key)
    return context, ca_fingerprint(files.ca_cert)


def token(fingerprint: str | None) -> str:
    return str(JoinTokenText(fingerprint, "0123abcd0123abcd", SECRET))


def join(cli: Any, url: str, token: str, *more: str) -> Any:
    return cli("worker", "join", url, "--token", token, "--name", "w1", *more, timeout=60)


@pytest.mark.parametrize(
    "text",
    [
        "nonsense",
        f"apjoin2.-.id.{SECRET}",
        f"apjoin1.abc.id.{SECRET}",
        f"apjoin1.-.id.{SECRET}.extra",
        "apjoin1.-.id.",
        f"apjoin1.-.i/d.{SECRET}",
    ],
)
def test_a_malformed_token_is_refused_without_echoing_it(cli: Any, text: str, data_dir: Path) -> None:
    result = join(cli, "http://127.0.0.1:9", text)
    assert result.returncode == 1
    assert "join token" in result.stderr
    assert SECRET not in result.stderr
    assert not WorkerConfig.path(data_dir).exists()


def test_a_wrong_fingerprint_is_refused_before_the_secret_is_sent(
    cli: Any, server_tls: tuple[ssl.SSLContext, str], data_dir: Path
) -> None:
    context, _ = server_tls
    with standin(201, "", tls=context) as server:
        result = join(cli, server.url, token("sha256:" + "0" * 64))
        assert server.bodies == []  # the secret never left
    assert result.returncode == 1
    assert "does not present the CA with fingerprint" in result.stderr
    assert not WorkerConfig.path(data_dir).exists()


def test_a_refused_join_says_the_servers_reason(
    cli: Any, server_tls: tuple[ssl.SSLContext, str], data_dir: Path
) -> None:
    """Over TLS pinned from the token (the request reached it), a 401 with the server's message."""
    context, fingerprint = server_tls
    with standin(401, "the join token expired at 2026-12-06T10:00:00Z", tls=context) as server:
        result = join(cli, server.url, token(fingerprint))
        assert [body["path"] for body in server.bodies] == ["/api/v1/cluster/join"]
        sent = server.bodies[0]
        assert sent["token"] == token(fingerprint)
        assert sent["name"] == "w1"
        assert {"memory_budget", "version", "gpus", "disk_free_bytes"} <= set(sent["capabilities"])
    assert result.returncode == 1
    assert "refused the join token: the join token expired at 2026-12-06T10:00:00Z" in result.stderr
    assert "nodes token create" in result.stderr
    assert not WorkerConfig.path(data_dir).exists()


def test_any_other_refusal_is_the_servers_own_message(cli: Any, data_dir: Path) -> None:
    with standin(400, "Validation failed for POST /api/v1/cluster/join: name") as server:
        result = join(cli, server.url, token(None))
    assert result.returncode == 1
    assert "Validation failed for POST /api/v1/cluster/join: name" in result.stderr
    assert not WorkerConfig.path(data_dir).exists()


def test_a_name_taken_is_a_conflict(cli: Any) -> None:
    with standin(409, "the name w1 is taken by another node") as server:
        result = join(cli, server.url, token(None))
    assert result.returncode == 1
    assert "the name w1 is taken by another node" in result.stderr
    assert "--name" in result.stderr


@pytest.mark.parametrize(
    ("url", "pinned", "expected"),
    [
        ("http://192.0.2.10:8080", False, "refusing to join http://192.0.2.10:8080 over plain HTTP"),
        ("https://127.0.0.1:9", False, "there is no fingerprint to pin"),
        ("http://127.0.0.1:9", True, "join its https:// address"),
        ("ftp://127.0.0.1:9", False, "not a server's address"),
        ("http://127.0.0.1:9/api", False, "not a server's address"),
    ],
)
def test_an_address_the_token_cannot_secure_is_refused(
    cli: Any, url: str, pinned: bool, expected: str, data_dir: Path
) -> None:
    text = token("sha256:" + "ab" * 32 if pinned else None)
    result = join(cli, url, text)
    assert result.returncode == 1
    assert expected in result.stderr
    assert not WorkerConfig.path(data_dir).exists()


def test_plain_http_beyond_loopback_goes_on_with_insecure_http(cli: Any) -> None:
    """Past the transport check: the address (TEST-NET, never routed) is then simply unreachable."""
    result = join(cli, "http://192.0.2.10:8080", token(None), "--insecure-http")
    assert result.returncode == 1
    assert "cannot reach http://192.0.2.10:8080" in result.stderr


def test_a_data_dir_joined_to_another_server_is_refused(cli: Any, data_dir: Path) -> None:
    WorkerConfig("http://127.0.0.1:1", "n1", "old", "apnode_x").write(data_dir)
    assert stat.S_IMODE(WorkerConfig.path(data_dir).stat().st_mode) == 0o600
    with standin(201, "") as server:
        result = join(cli, server.url, token(None))
        assert server.bodies == []
    assert result.returncode == 1
    assert "is already joined to another server (http://127.0.0.1:1) as node old" in result.stderr
    assert WorkerConfig.read(data_dir) == WorkerConfig("http://127.0.0.1:1", "n1", "old", "apnode_x")


def test_its_own_data_dir_option_wins(cli: Any, tmp_path: Path) -> None:
    other = tmp_path / "worker"
    WorkerConfig("http://127.0.0.1:1", "n1", "old", "apnode_x").write(other)
    result = cli(
        "worker",
        "join",
        "http://127.0.0.1:1",
        "--token",
        token(None),
        "--data-dir",
        str(other),
    )
    assert result.returncode == 1
    assert "already joined to this server" in result.stderr
    assert "appliance worker run" in result.stderr


def test_run_needs_a_joined_data_dir(cli: Any, data_dir: Path) -> None:
    result = cli("worker", "run")
    assert result.returncode == 1
    assert f"{data_dir} has not joined a server" in result.stderr
    assert "appliance worker join" in result.stderr


def test_run_refuses_a_damaged_worker_file(cli: Any, data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    WorkerConfig.path(data_dir).write_text('{"server": 1}')
    result = cli("worker", "run")
    assert result.returncode == 1
    assert "is not a worker file" in result.stderr
