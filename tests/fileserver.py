"""A real HTTP file server on loopback with Range support and fault injection, for pull tests.

Each served file has a ``Faults`` record the test sets: ignore Range, drop the connection or
stall after some body bytes (for the first N responses), corrupt a byte, answer with a list of
error statuses first, cap each connection's bandwidth. Every request is logged.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

__all__ = ["Faults", "FileServer", "Hit", "serve_files"]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 64 * 1024


@dataclass
class Faults:
    ignore_range: bool = False
    drop_after: int | None = None  # close the connection after this many body bytes ...
    stall_after: int | None = None  # ... or go silent for stall_seconds
    stall_seconds: float = 0.0
    faulty_responses: int = 1  # how many body responses get drop/stall
    corrupt: bool = False  # flip one byte in the middle of the file
    statuses: list[int] = field(default_factory=list)  # answered (and consumed) before the file
    bytes_per_second: int | None = None  # per connection
    etag: str | None = '"v1"'  # None: send no ETag (nor Last-Modified), as some servers do


@dataclass(frozen=True)
class Hit:
    path: str
    range: str | None
    status: int
    authorization: str | None = None


class FileServer:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, Faults] = {}
        self.hits: list[Hit] = []
        self.documents: dict[str, tuple[int, bytes, dict[str, str]]] = {}  # JSON answers (a hub's API)
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        # (the Authorization every request must carry, the WWW-Authenticate of the 401, exempt paths)
        self.require_authorization: tuple[str, str, set[str]] | None = None
        self._lock = threading.Lock()
        self._faulty_sent: dict[str, int] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        # serve_forever looks for a shutdown every poll_interval: stopping waits up to that long.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, path: str, content: bytes, faults: Faults | None = None) -> str:
        self.files[path] = content
        self.faults[path] = faults or Faults()
        return f"{self.url}{path}"

    def add_json(
        self, path: str, document: object, *, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.documents[path] = (status, json.dumps(document).encode(), headers or {})

    def hits_for(self, path: str) -> list[Hit]:
        with self._lock:
            return [hit for hit in self.hits if hit.path == path]

    def body_requests(self, path: str) -> list[Hit]:
        """Requests that asked for file content (not the one-byte probe)."""
        return [hit for hit in self.hits_for(path) if hit.range != "bytes=0-0" and hit.status in (200, 206)]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _log(
        self, path: str, range_header: str | None, status: int, authorization: str | None = None
    ) -> None:
        with self._lock:
            self.hits.append(Hit(path, range_header, status, authorization))

    def _take_fault(self, path: str) -> bool:
        with self._lock:
            sent = self._faulty_sent.get(path, 0)
            if sent >= self.faults[path].faulty_responses:
                return False
            self._faulty_sent[path] = sent + 1
            return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:
                path = unquote(self.path.split("?", 1)[0])
                range_header = self.headers.get("Range")
                authorization = self.headers.get("Authorization")
                required = server.require_authorization
                if required is not None and path not in required[2] and authorization != required[0]:
                    server._log(path, range_header, 401, authorization)
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", required[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.redirects:
                    server._log(path, range_header, 302, authorization)
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.documents:
                    status, body, headers = server.documents[path]
                    server._log(path, range_header, status, authorization)
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if path not in server.files:
                    server._log(path, range_header, 404)
                    self._empty(404)
                    return
                faults = server.faults[path]
                with server._lock:
                    status = faults.statuses.pop(0) if faults.statuses else None
                if status is not None:
                    server._log(path, range_header, status)
                    self._empty(status)
                    return
                content = server.files[path]
                if faults.corrupt:
                    middle = len(content) // 2
                    content = content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]
                start, end = 0, len(content) - 1
                status = 200
                match = _RANGE.match(range_header or "")
                if match and not faults.ignore_range:
                    start = int(match.group(1))
                    end = min(int(match.group(2)) if match.group(2) else end, len(content) - 1)
                    if start >= len(content):
                        server._log(path, range_header, 416)
                        self._empty(416)
                        return
                    status = 206
                server._log(path, range_header, status, authorization)
                self.send_response(status)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "none" if faults.ignore_range else "bytes")
                if faults.etag is not None:
                    self.send_header("ETag", faults.etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
                self.end_headers()
                self._body(path, content, start, end, faults, probe=range_header == "bytes=0-0")

            def _body(
                self, path: str, content: bytes, start: int, end: int, faults: Faults, *, probe: bool
            ) -> None:
                faulty = not probe and (faults.drop_after is not None or faults.stall_after is not None)
                faulty = faulty and server._take_fault(path)
                sent = 0
                offset = start
                started = time.monotonic()
                while offset <= end:
                    chunk = content[offset : min(offset + CHUNK, end + 1)]
                    if faulty and faults.drop_after is not None and sent + len(chunk) > faults.drop_after:
                        self.wfile.write(chunk[: faults.drop_after - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if faulty and faults.stall_after is not None and sent >= faults.stall_after:
                        time.sleep(faults.stall_seconds)
                        faulty = False
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    sent += len(chunk)
                    offset += len(chunk)
                    if faults.bytes_per_second:
                        ahead = sent / faults.bytes_per_second - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)

            def _empty(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


@contextmanager
def serve_files(ssl_context: ssl.SSLContext | None = None) -> Iterator[FileServer]:
    """A started FileServer; over TLS with ``ssl_context`` (its URLs still say http://)."""
    server = FileServer(ssl_context)
    server.start()
    try:
        yield server
    finally:
        server.stop()
