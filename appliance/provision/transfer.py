"""The one download engine every scheme's bytes go through.

A file is fetched into ``<data>/tmp/downloads/<key>.partial`` next to ``<key>.state.json``.
When the server honours Range, the file is cut into parts that up to ``connections`` workers
fetch in order, each writing at its own offset. A hashing thread follows the completed prefix
of the file, so the sha256 is ready soon after the last byte arrives; that is why parts are
small (about eight per connection, in whole MiB, at most ``part_bytes``): the last wave of
parts is what is left to hash after the last byte. The state file records how many bytes of
each part are on disk (once a second, each time after an fdatasync of the data, so it
never claims bytes that a power cut could lose), so a pull that was killed or failed resumes
where it stopped, provided the server still reports the same size and validator (ETag or
Last-Modified), or, from a server that sends no validator, when something will check the result
(the caller's digest, the source's, or a git blob id), so stale parts cannot pass. Otherwise
the download starts over, and ``on_note`` says why.

A caller may check the file's first bytes (``check_header``) as soon as they are on disk, to
refuse a file that is not what it should be before the rest of it is fetched.

A part that fails (dropped connection, 5xx, 429, or a stall: no byte for ``stall_timeout``)
is retried with exponential backoff; ``retries`` counts failures in a row without progress.
A server that ignores Range gets one sequential stream, hashed as it is written.

httpx makes every request (redirects, proxies, TLS, credentials). Over plain HTTP/1.x, once a part's
headers and h11's first read are in, the rest of that part's body is read from the socket itself
(``_receive``): at gigabytes a minute, h11 and httpx cost more CPU than the kernel's copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import (
    CredentialsRefused,
    DownloadCancelled,
    DownloadFailed,
    RemoteNotFound,
    SourceNotAllowed,
)
from appliance.settings import DownloadSettings

__all__ = ["HEADER_BYTES", "RemoteFile", "Transfer", "TransferResult"]

# Read back in large slices: the hash thread takes the GIL once per slice, and with 16 part threads
# holding it in turn, 256 KiB slices left it behind (bench/pull.py, 1 GiB, against the build before
# in the same runs: 0.70x its time with 8 MiB slices, 0.84x with 256 KiB).
HASH_READ_BYTES = 8 * 1024 * 1024
MIB = 1024 * 1024
SOCKET_READ_BYTES = 124 * 1024
# A part's body past h11's first read is received straight from a plain TCP socket (see _receive):
# into one buffer per connection, waking only once RECEIVE_LOW_WATER bytes are queued. A bare
# 16-connection download of 1 GiB from nginx (40 MiB/s a connection, no hashing) went from 2.3 to
# 1.3 CPU-seconds; 1 MiB low-water marks and 2 MiB buffers were no better (BENCHMARKS.md, Pull).
RECEIVE_BYTES = 1024 * 1024
RECEIVE_LOW_WATER = 256 * 1024
LOW_WATER_WAIT = 0.25  # seconds: how often a reader waiting for the low-water mark looks for a cancel
PARTS_PER_CONNECTION = 8
STATE_SAVE_INTERVAL = 1.0
REAUTH_GRACE = 5.0  # seconds in which a fresh token counts as fresh
HEADER_BYTES = 64  # what check_header is given: enough for any format's magic and header length
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

# (bytes on disk, total bytes or None)
TransferProgress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where from, and what the source says about it."""

    url: str
    filename: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may carry credentials
    digest: str | None = None  # the source's own sha256, when it publishes one
    size: int | None = None
    git_blob: str | None = None  # a git blob id (sha1 of "blob <size>\0" + content), for small hub files
    # asks the source for fresh credentials (new headers) when a short-lived token has expired
    reauthorize: Callable[[], dict[str, str]] | None = field(default=None, compare=False, repr=False)
    # what stays the same between attempts when the URL does not (a presigned URL is new each time)
    identity: str | None = None
    # the settings that hold the credentials the request carries, when the user set some
    credentials: str | None = None

    @property
    def key(self) -> str:
        """Names the partial file and its state: the identity, else the URL."""
        return self.identity or self.url


@dataclass(frozen=True)
class TransferResult:
    digest: str
    size: int
    resumed_bytes: int  # bytes found on disk from an earlier attempt
    parts: int


class _RetryablePartError(Exception):
    pass


@dataclass
class _Probe:
    size: int | None
    validator: str | None
    ranges: bool


class Transfer:
    """Fetch one RemoteFile into a partial file; ``run`` returns its sha256 and size."""

    def __init__(
        self,
        client: httpx.Client,
        remote: RemoteFile,
        partial: Path,
        options: DownloadSettings,
        *,
        on_progress: TransferProgress | None = None,
        before_body: Callable[[int | None], None] | None = None,
        cancel: threading.Event | None = None,
        checked_against: str | None = None,
        check_header: Callable[[bytes, int], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.remote = remote
        self.partial = partial
        self.state_path = partial.with_suffix(".state.json")
        self.options = options
        self.on_progress = on_progress
        self.before_body = before_body  # told the size before any body byte is written; may refuse
        self.cancel = cancel or threading.Event()
        # the digest (or git blob id) the finished file will be verified against, if any
        self.checked_against = checked_against
        self.check_header = check_header  # given the first bytes and the size; may refuse the file
        self.on_note = on_note
        self._header_checked = False
        self._lock = threading.Lock()
        self._done: list[int] = []
        self._part_bytes = options.part_bytes
        self._bytes_done = 0
        self._save_lock = threading.Lock()
        self._failed = threading.Event()  # a part failed for good: the others stop
        self._fresh_headers: dict[str, str] = {}
        self._reauth_lock = threading.Lock()
        self._renewed_at = 0.0
        _read_larger()

    # -- entry ---------------------------------------------------------------------------------

    def run(self, fd: int) -> TransferResult:
        """Fill the open (and flock'ed) partial file ``fd``."""
        probe, first = self._probe()
        try:
            if self.before_body is not None:
                self.before_body(probe.size)
            if probe.ranges and probe.size is not None:
                return self._ranged(fd, probe)
            if first is None:
                first = self._open_stream({})
            return self._sequential(fd, first, probe.size)
        finally:
            if first is not None:
                first.close()

    def discard(self) -> None:
        """Remove the partial and its state (after a verification failure or a finished placement)."""
        for path in (self.partial, self.state_path, self.state_path.with_suffix(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- probing -------------------------------------------------------------------------------

    def _probe(self) -> tuple[_Probe, httpx.Response | None]:
        """Ask for the first byte: a 206 says Range works and gives the size; a 200 is the whole body,
        kept open for the sequential path."""
        response = self._open_stream({"Range": "bytes=0-0"})
        etag = response.headers.get("etag")
        # If-Range only works with a strong validator
        validator = etag if etag and not etag.startswith("W/") else response.headers.get("last-modified")
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            response.close()
            if match and match.group(3) != "*":
                return _Probe(int(match.group(3)), validator, ranges=True), None
            return _Probe(None, validator, ranges=False), None
        if response.status_code == 416:  # an empty file has no byte 0
            response.close()
            return _Probe(0, validator, ranges=True), None
        length = response.headers.get("content-length")
        return _Probe(int(length) if length is not None else None, validator, ranges=False), response

    def _open_stream(self, headers: dict[str, str]) -> httpx.Response:
        """GET with retries for transport errors and 5xx/429; 4xx is final."""
        failures = 0
        while True:
            self._check_cancel()
            try:
                request = self.client.build_request("GET", self.remote.url, headers=self._headers(headers))
                response = self.client.send(request, stream=True, follow_redirects=True)
            except httpx.TransportError as exc:
                failures += 1
                self._give_up_or_wait(failures, f"cannot reach {self._where()}: {exc}")
                continue
            if response.status_code in (200, 206, 416):
                return response
            response.close()
            try:
                self._raise_for_status(response)
            except _RetryablePartError as exc:  # fresh credentials: ask again
                failures += 1
                self._give_up_or_wait(failures, str(exc))
                continue
            failures += 1
            self._give_up_or_wait(failures, f"{self._where()} answered {response.status_code}")

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        # identity: the bytes on disk must be the file itself, not a compressed body
        return {**self.remote.headers, **self._fresh_headers, **extra, "Accept-Encoding": "identity"}

    def _reauthorize(self) -> bool:
        """Renew a token that expired mid-download (registries hand out tokens for minutes). A 401
        right after a renewal (or one from a source that cannot renew) is a refusal, not expiry."""
        if self.remote.reauthorize is None:
            return False
        with self._reauth_lock:
            now = time.monotonic()
            if now - self._renewed_at < REAUTH_GRACE:
                return True  # another part just renewed it: retry with the new token
            if self._renewed_at and now - self._renewed_at < 2 * REAUTH_GRACE:
                return False
            self._fresh_headers = self.remote.reauthorize()
            self._renewed_at = time.monotonic()
            return True

    def _raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 404 or status == 410:
            raise RemoteNotFound(f"{self._where()} answered {status}: no such file")
        if status == 401 and self._reauthorize():
            raise _RetryablePartError(f"{self._where()} answered 401; asked for fresh credentials")
        if status in (401, 403) and self.remote.credentials is not None:
            raise CredentialsRefused(
                f"{self._where()} answered {status}: it refused the credentials sent",
                hint=f"check {self.remote.credentials}, and that they give access to this file",
            )
        if status in (401, 403):
            raise SourceNotAllowed(
                f"{self._where()} answered {status}: access denied",
                hint="the source needs credentials; set the token for it in the settings",
            )
        if 400 <= status < 500 and status not in (408, 429):
            raise DownloadFailed(f"{self._where()} answered {status}", hint="check the reference")

    def _give_up_or_wait(self, failures: int, message: str) -> None:
        if failures > self.options.retries:
            raise DownloadFailed(f"{message} (gave up after {failures} tries)")
        # 0.25 s, 0.5 s, 1 s ... capped at 8 s; cancel wakes it at once
        if self.cancel.wait(min(0.25 * 2 ** (failures - 1), 8.0)):
            raise DownloadCancelled("the download was cancelled")

    def _where(self) -> str:
        split = httpx.URL(self.remote.url)
        return f"{split.scheme}://{split.host}{':' + str(split.port) if split.port else ''}{split.path}"

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled("the download was cancelled")

    # -- ranged, resumable ---------------------------------------------------------------------

    def _ranged(self, fd: int, probe: _Probe) -> TransferResult:
        assert probe.size is not None
        size = probe.size
        part_bytes = self._part_bytes = _part_size(size, self.options)
        count = max(1, -(-size // part_bytes))
        starts = [index * part_bytes for index in range(count)]
        lengths = [min(part_bytes, size - start) for start in starts]
        self._done = self._load_state(probe, count) or [0] * count
        resumed = self._bytes_done = sum(self._done)
        if resumed == 0:
            os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        self._save_state(fd, probe)
        if self._done[0] >= min(HEADER_BYTES, lengths[0]):  # the first bytes are on disk already
            self._check_header(fd, size)

        work: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(count):
            if self._done[index] < lengths[index]:
                work.put(index)
        errors: list[BaseException] = []
        changed = threading.Condition(self._lock)
        workers_done = threading.Event()
        hasher = _PrefixHasher(fd, starts, lengths, self._done, changed)

        def worker() -> None:
            buffer = bytearray(RECEIVE_BYTES)  # this connection's, for every part it fetches
            while not self._failed.is_set():
                try:
                    index = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._fetch_part(fd, index, starts[index], lengths[index], probe, buffer)
                except BaseException as exc:  # handed to the caller below
                    errors.append(exc)
                    self._failed.set()
                    return
                finally:
                    with changed:
                        changed.notify_all()

        workers = [
            threading.Thread(target=worker, name=f"part-{n}", daemon=True)
            for n in range(min(self.options.connections, work.qsize() or 1))
        ]
        hashing = threading.Thread(target=hasher.run, args=(workers_done,), name="hash", daemon=True)
        hashing.start()
        stop_saving = threading.Event()
        saving = threading.Thread(
            target=self._keep_saving, args=(fd, probe, stop_saving), name="state", daemon=True
        )
        saving.start()
        try:
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join()
        except BaseException:
            self._failed.set()  # Ctrl-C: the workers stop before the caller closes the file they write to
            raise
        finally:
            for thread in workers:
                if thread.is_alive():
                    thread.join()
            with changed:
                workers_done.set()
                changed.notify_all()
            hashing.join()
            stop_saving.set()
            saving.join()
            self._save_state(fd, probe)  # the last word: a later pull resumes from here, or keeps it whole
        if errors:
            raise errors[0]
        if hasher.error is not None:
            raise hasher.error
        os.fsync(fd)
        return TransferResult(f"sha256:{hasher.hexdigest()}", size, resumed, count)

    def _fetch_part(
        self, fd: int, index: int, start: int, length: int, probe: _Probe, buffer: bytearray
    ) -> None:
        failures = 0
        while self._done[index] < length:
            self._check_cancel()
            if self._failed.is_set():
                return
            offset = start + self._done[index]
            before = self._done[index]
            try:
                self._stream_range(fd, index, offset, start + length - 1, probe, buffer)
            except _RetryablePartError as exc:
                failures = 0 if self._done[index] > before else failures + 1
                self._give_up_or_wait(failures, str(exc))

    def _stream_range(
        self, fd: int, index: int, first: int, last: int, probe: _Probe, buffer: bytearray
    ) -> None:
        headers = {"Range": f"bytes={first}-{last}"}
        if probe.validator:
            headers["If-Range"] = probe.validator
        try:
            with self.client.stream(
                "GET",
                self.remote.url,
                headers=self._headers(headers),
                follow_redirects=True,
            ) as response:
                if response.status_code != 206:
                    if response.status_code == 200:
                        raise DownloadFailed(
                            f"{self._where()} changed while it was downloaded (it no longer answers a Range"
                            " request with the part asked for)",
                            hint="pull again; the download starts over",
                        )
                    self._raise_for_status(response)
                    raise _RetryablePartError(f"{self._where()} answered {response.status_code}")
                match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != first:
                    raise DownloadFailed(f"{self._where()} sent another range than the one asked for")
                offset = first
                direct = _plain_socket(response)
                chunks = response.iter_raw()  # held while the socket is read: closing it closes the socket
                for chunk in chunks:
                    if self.cancel.is_set() or self._failed.is_set():
                        return
                    if len(chunk) > last + 1 - offset:  # more than asked for: keep only the part
                        chunk = chunk[: last + 1 - offset]
                    offset = self._accept(fd, index, chunk, offset, probe)
                    if offset > last or direct is not None:
                        break  # h11 holds no more of the body: the rest is read from the socket itself
                if direct is not None and offset <= last:
                    offset = self._receive(direct, fd, index, offset, last, probe, buffer)
        except httpx.TransportError as exc:  # a dropped connection, or a stall (read timeout)
            raise _RetryablePartError(f"the connection to {self._where()} failed: {exc!r}") from exc
        if offset <= last and not (self.cancel.is_set() or self._failed.is_set()):
            raise _RetryablePartError(f"{self._where()} ended the part early")

    def _receive(
        self,
        sock: socket.socket,
        fd: int,
        index: int,
        offset: int,
        last: int,
        probe: _Probe,
        buffer: bytearray,
    ) -> int:
        """Read the rest of a part straight from a plain TCP socket into ``buffer`` and write it at its
        offset: no h11 parsing and no new bytes object per read. The socket wakes the thread only
        once RECEIVE_LOW_WATER bytes are queued, so each read takes a large slice. The connection is
        never reused afterwards (h11 still expects the body, so httpcore closes it when the response
        closes). Returns the offset reached; an error or the server closing early ends it sooner."""
        stall = self.options.stall_timeout
        sock.settimeout(min(LOW_WATER_WAIT, stall))
        low_water = RECEIVE_LOW_WATER
        set_low_water = 0
        view = memoryview(buffer)
        last_byte_at = time.monotonic()
        while offset <= last:
            if self.cancel.is_set() or self._failed.is_set():
                return offset
            wanted = min(len(view), last + 1 - offset)
            if min(low_water, wanted) != set_low_water:  # never wait for more than the part has left
                set_low_water = min(low_water, wanted)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, set_low_water)
            try:
                count = sock.recv_into(view[:wanted])
            except TimeoutError as exc:
                if time.monotonic() - last_byte_at > stall:
                    raise _RetryablePartError(f"{self._where()} sent nothing for {stall:g} s") from exc
                low_water = 1  # a slow connection: take bytes as they come, for the rest of the part
                continue
            except OSError as exc:  # a reset connection
                raise _RetryablePartError(f"the connection to {self._where()} failed: {exc!r}") from exc
            if count == 0:
                return offset  # the server closed the connection
            last_byte_at = time.monotonic()
            offset = self._accept(fd, index, view[:count], offset, probe)
        return offset

    def _accept(self, fd: int, index: int, data: bytes | memoryview, offset: int, probe: _Probe) -> int:
        """Write a part's next bytes at ``offset`` and count them; returns the offset after them."""
        _pwrite_all(fd, data, offset)
        end = offset + len(data)
        with self._lock:
            self._done[index] += len(data)
            self._bytes_done += len(data)
        if index == 0 and (end >= HEADER_BYTES or end == probe.size):
            self._check_header(fd, probe.size)
        self._report(probe)
        return end

    def _check_header(self, fd: int, size: int | None) -> None:
        """Once per transfer, as soon as the file's first bytes are on disk (a file of unknown size
        is checked when it has arrived whole, by the caller)."""
        if self.check_header is None or self._header_checked or size is None:
            return
        self._header_checked = True
        self.check_header(os.pread(fd, HEADER_BYTES, 0), size)

    def _note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)

    def _report(self, probe: _Probe) -> None:
        if self.on_progress is not None:
            self.on_progress(self._bytes_done, probe.size)  # a running total: this runs for every chunk

    def _load_state(self, probe: _Probe, count: int) -> list[int] | None:
        """The bytes per part an earlier attempt left, when they are still parts of this file."""
        try:
            state = json.loads(self.state_path.read_text())
            done = [int(value) for value in state["done"]]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        why = self._why_not_resume(state, probe, count)
        if why is None:
            return done
        if sum(done):
            self._note(f"the download starts over ({sum(done)} bytes were on disk): {why}")
        return None

    def _why_not_resume(self, state: dict[str, Any], probe: _Probe, count: int) -> str | None:
        if state.get("source") != self.remote.key:
            return "the bytes on disk are of another source"
        if state.get("size") != probe.size:
            return f"{self._where()} now reports another size"
        if probe.validator is not None and state.get("validator") != probe.validator:
            return f"{self._where()} now reports another ETag or Last-Modified: the file changed"
        if probe.validator is None and self.checked_against is None:
            return (
                f"{self._where()} sends no ETag or Last-Modified and no digest was given, so nothing"
                " tells whether the bytes on disk are of the same file (pass --digest to resume)"
            )
        if state.get("part_bytes") != self._part_bytes or len(state["done"]) != count:
            return "the download settings (part size) changed"
        return None

    def _save_state(self, fd: int, probe: _Probe) -> None:
        """Record the bytes on disk per part. The counts are taken first and the data made durable
        before the record replaces the old one, so even after a power cut no part claims bytes
        that never reached the disk."""
        with self._save_lock:
            with self._lock:
                done = list(self._done)
            os.fdatasync(fd)
            state: dict[str, Any] = {
                "source": self.remote.key,
                "size": probe.size,
                "validator": probe.validator,
                "part_bytes": self._part_bytes,
                "done": done,
            }
            staging = self.state_path.with_suffix(".tmp")
            staging.write_text(json.dumps(state))
            os.replace(staging, self.state_path)

    def _keep_saving(self, fd: int, probe: _Probe, stop: threading.Event) -> None:
        """A thread of its own: the workers never wait for the disk."""
        while not stop.wait(STATE_SAVE_INTERVAL):
            self._save_state(fd, probe)

    # -- sequential ----------------------------------------------------------------------------

    def _sequential(self, fd: int, response: httpx.Response, size: int | None) -> TransferResult:
        """One stream from the start, hashed as it is written; a failure starts it over."""
        failures = 0
        while True:
            digest = hashlib.sha256()
            written = 0
            os.ftruncate(fd, 0)
            try:
                for chunk in response.iter_raw():
                    self._check_cancel()
                    _pwrite_all(fd, chunk, written)
                    digest.update(chunk)
                    os.posix_fadvise(fd, written, len(chunk), os.POSIX_FADV_DONTNEED)
                    written += len(chunk)
                    if written >= HEADER_BYTES or written == size:
                        self._check_header(fd, size)
                    if self.on_progress is not None:
                        self.on_progress(written, size)
                if size is None or written == size:
                    os.fsync(fd)
                    return TransferResult(f"sha256:{digest.hexdigest()}", written, 0, 1)
                message = f"{self._where()} ended the body after {written} of {size} bytes"
            except httpx.TransportError as exc:
                message = f"the connection to {self._where()} failed: {exc!r}"
            finally:
                response.close()
            failures += 1
            self._give_up_or_wait(failures, message)
            response = self._open_stream({})


class _PrefixHasher:
    """Hashes the file's completed prefix while the parts arrive; the parts are fetched in order,
    so the prefix grows during the download and little is left to hash at the end."""

    def __init__(
        self, fd: int, starts: list[int], lengths: list[int], done: list[int], changed: threading.Condition
    ) -> None:
        self.fd = fd
        self.starts = starts
        self.lengths = lengths
        self.done = done
        self.changed = changed
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self._buffer = bytearray(HASH_READ_BYTES)  # one for every part: a fresh one is 8 MiB to zero

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def run(self, workers_done: threading.Event) -> None:
        try:
            for index in range(len(self.starts)):
                with self.changed:
                    while self.done[index] < self.lengths[index]:
                        if workers_done.is_set():
                            return  # a part failed or was cancelled: no digest
                        self.changed.wait(0.5)
                self._hash_range(self.starts[index], self.lengths[index])
        except BaseException as exc:  # the transfer raises it
            self.error = exc

    def _hash_range(self, start: int, length: int) -> None:
        view = memoryview(self._buffer)
        end = start + length
        offset = start
        while offset < end:
            count = os.preadv(self.fd, [view[: min(len(view), end - offset)]], offset)
            if count == 0:
                raise DownloadFailed("the partial file is shorter than its parts say")
            self.digest.update(view[:count])
            offset += count
        # Hashed: start writing it back now, so the closing fsync finds little left to do.
        os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)


def _read_larger() -> None:
    """httpcore reads at most 64 KiB per recv (a class attribute; neither httpx nor httpcore takes a
    read size), so a fast part went through h11 and httpx thousands of times a second. A larger limit
    only lets a read take what the socket already holds (about 110 KiB against nginx at 40 MiB/s a
    connection); it never waits for more, so streamed answers are as prompt. It stays under glibc's
    128 KiB mmap threshold: each read's buffer is a new allocation, and at 1 MiB every one was a
    fresh mapping, faulted in page by page (200,000 page faults a GiB against 30,000).
    Set here, not at import: httpcore is imported only once a client sends."""
    import httpcore

    connection = httpcore.HTTP11Connection
    connection.READ_NUM_BYTES = max(connection.READ_NUM_BYTES, SOCKET_READ_BYTES)


def _plain_socket(response: httpx.Response) -> socket.socket | None:
    """The plain TCP socket a ranged answer's body arrives on, when the rest of the body can be read
    from it directly: HTTP/1.x with a Content-Length (no chunked framing) and no TLS. None otherwise,
    and the body goes through httpx."""
    if response.http_version not in ("HTTP/1.0", "HTTP/1.1") or "content-length" not in response.headers:
        return None
    if "transfer-encoding" in response.headers:
        return None
    stream = response.extensions.get("network_stream")
    if stream is None or stream.get_extra_info("ssl_object") is not None:
        return None
    sock = stream.get_extra_info("socket")
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    return sock


def _part_size(size: int, options: DownloadSettings) -> int:
    wanted = -(-size // (options.connections * PARTS_PER_CONNECTION))
    return max(MIB, min(options.part_bytes, -(-wanted // MIB) * MIB))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
