"""The content-addressed blob cache on disk.

    <data>/VERSION                     layout version (an int); a newer layout migrates an older one
    <data>/blobs/sha256/<hex>          immutable content, read-only mode, named by its sha256
    <data>/tmp/<random>.partial        an import in flight (copy or reflink); never served
    <data>/tmp/<random>.link           an import in flight (hard link to the source, asked for
                                       explicitly); never served
    <data>/tmp/downloads/<key>.partial a download, resumable (``<key>.state.json`` says which parts
                                       are on disk); never served
    <data>/tmp/downloads/<key>.lock    flock: one pull of a ref at a time, or one of the
                                       models.download.max_parallel download slots
    <data>/quarantine/sha256/<hex>     blobs whose content no longer matched their name
    <data>/cache.lock                  flock: imports place blobs under a shared lock, deletions
                                       take it exclusively, so a blob is never deleted between
                                       being placed and being registered

Staging writes to a unique temp file while hashing, verifies, fsyncs, and only then renames
into ``blobs/``: nothing partial or unverified is ever visible there. A source on the same
filesystem is reflinked (copy-on-write: later writes to the source never reach the blob) where
the filesystem can, else copied. A hard link shares the inode with the user's file, so anyone
who may write that file (its owner, root) could change the blob: it is made only when asked,
for a file the appliance's own user owns, and the blob's inode identity (``link_stat``) is
recorded so that a change is noticed, and the blob re-hashed, before the engine maps it.

A staging file is flock'ed by its owner for as long as it lives, so ``stale_partials`` can tell an import that
is still running from one whose process died.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance.errors import (
    DigestMismatch,
    DiskFull,
    InvalidInput,
    LayoutTooNew,
    SourceNotFound,
    SourceUnreadable,
    StorageFailure,
)

__all__ = ["LAYOUT_VERSION", "BlobCache", "IncomingBlob", "StagedBlob", "open_source"]

LAYOUT_VERSION = 1
CHUNK_BYTES = 8 * 1024 * 1024
READ_BACK_BYTES = 256 * 1024  # read back in slices that stay in the CPU's cache while hashed
COPY_AHEAD = 4  # chunks copied and not yet hashed, at most (32 MiB of the page cache)
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)

ProgressCallback = Callable[[int], None]
StageMethod = Literal["copy", "reflink", "hardlink", "download"]


def _storage_error(exc: OSError, where: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the disk holding {where}")
    return StorageFailure(f"cannot write under {where}: {exc.strerror or exc}")


@dataclass
class StagedBlob:
    """Content that has been written and hashed but is not yet in ``blobs/``."""

    path: Path
    digest: str
    size: int
    method: StageMethod
    _fd: int = field(repr=False)
    link_stat: str | None = None  # set by ``place`` when the blob is a hard link to the source
    _linked: tuple[int, int] | None = field(default=None, repr=False)  # its (size, mtime) as hashed

    def release(self) -> None:
        """Close the staging file but keep it on disk (a finished download, kept to resume)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Drop the staging file (a no-op once it has been placed)."""
        if self._fd < 0:
            return
        with suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = -1


class IncomingBlob:
    """Bytes arriving in pieces (an upload) on their way into ``blobs/``: a unique staging file,
    flock'ed like every staging file (so garbage collection leaves it alone while it lives) and
    hashed as it is written. ``finish`` verifies, fsyncs and places it; ``close`` (or leaving the
    ``with`` block) removes it on every other path."""

    def __init__(self, cache: BlobCache) -> None:
        self._cache = cache
        self._hasher = hashlib.sha256()
        path, fd = cache._new_staging_file(".partial")
        self._staged = StagedBlob(path=path, digest="", size=0, method="copy", _fd=fd)

    def __enter__(self) -> IncomingBlob:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        try:
            _write_all(self._staged._fd, memoryview(data))
        except OSError as exc:
            raise _storage_error(exc, self._cache.tmp_dir) from exc
        self._hasher.update(data)
        self._staged.size += len(data)

    def finish(self, expected: str) -> Path:
        """Place the content under ``expected``; a 400 (changing nothing) when it hashes otherwise:
        the sender named the wrong digest, as Ollama's blob upload answers it."""
        actual = f"sha256:{self._hasher.hexdigest()}"
        if actual != expected:
            raise InvalidInput(
                f"digest mismatch: the body hashes to {actual}, not {expected}",
                hint="send the file whose sha256 is in the path",
            )
        try:
            os.fsync(self._staged._fd)
        except OSError as exc:
            raise _storage_error(exc, self._cache.tmp_dir) from exc
        self._staged.digest = actual
        with self._cache.placing():
            return self._cache.place(self._staged)

    def close(self) -> None:
        self._staged.close()  # a no-op once placed


class BlobCache:
    """Blob layout under one data dir. Thread- and process-safe; holds no open files between calls."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.blobs_dir = data_dir / "blobs" / "sha256"
        self.tmp_dir = data_dir / "tmp"
        self.downloads_dir = self.tmp_dir / "downloads"
        self.quarantine_dir = data_dir / "quarantine" / "sha256"
        self._lock_path = data_dir / "cache.lock"
        try:
            for directory in (self.blobs_dir, self.tmp_dir, self.quarantine_dir):
                directory.mkdir(parents=True, exist_ok=True)
            self._check_layout()
        except OSError as exc:
            raise _storage_error(exc, data_dir) from exc

    def _check_layout(self) -> None:
        version_file = self.data_dir / "VERSION"
        if not version_file.exists():
            staging = self.tmp_dir / f"VERSION.{uuid.uuid4().hex}"
            staging.write_text(f"{LAYOUT_VERSION}\n")
            os.replace(staging, version_file)
            return
        text = version_file.read_text().strip()
        if not text.isdigit():
            raise StorageFailure(
                f"{version_file} is damaged (it says {text[:20]!r})",
                hint=f"if this is an appliance data dir, write {LAYOUT_VERSION} into it",
            )
        if int(text) > LAYOUT_VERSION:
            raise LayoutTooNew(
                f"the data dir {self.data_dir} has cache layout {text};"
                f" this appliance knows layouts up to {LAYOUT_VERSION}"
            )

    # -- paths and locks ---------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        return self.blobs_dir / digest.removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    @contextmanager
    def _flock(self, operation: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)

    def placing(self) -> AbstractContextManager[None]:
        """Held while blobs are placed and registered; many at once."""
        return self._flock(fcntl.LOCK_SH)

    def deleting(self) -> AbstractContextManager[None]:
        """Held while unreferenced blobs are deleted; excludes placing."""
        return self._flock(fcntl.LOCK_EX)

    # -- staging -----------------------------------------------------------------------------

    def stage(
        self,
        source: Path,
        *,
        allow_link: bool = True,
        hard_link: bool = False,
        expected_digest: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> StagedBlob:
        """Bring ``source`` into ``tmp/``, hashed and fsynced.

        On the same filesystem it is reflinked (copy-on-write) where the filesystem can and
        ``allow_link``; with ``hard_link`` it is otherwise hard-linked (the source becomes
        read-only) and hashed once; else it is copied and hashed in the same pass. Raises
        DigestMismatch when ``expected_digest`` is given and the content differs.
        """
        src_fd = open_source(source)
        try:
            info = os.fstat(src_fd)
            size = info.st_size
            same_fs = info.st_dev == os.stat(self.tmp_dir).st_dev
            staged: StagedBlob | None = None
            if allow_link and same_fs:
                staged = self._try_reflink(src_fd, size, on_progress)
                if staged is None and hard_link:
                    if info.st_uid != os.geteuid():
                        raise InvalidInput(
                            f"{source} belongs to uid {info.st_uid}, not to the user the appliance runs as"
                            f" (uid {os.geteuid()}): through a hard link its owner could change the model",
                            hint="import it without --link (it is then copied), or chown the file first",
                        )
                    staged = self._try_hardlink(source, size, on_progress)
            if staged is None:
                staged = self._copy(src_fd, size, on_progress)
        finally:
            os.close(src_fd)
        if expected_digest is not None and staged.digest != expected_digest:
            staged.close()
            raise DigestMismatch(f"{source} has digest {staged.digest}, expected {expected_digest}")
        return staged

    def receive(self) -> IncomingBlob:
        """A new staging file for content that arrives in pieces (see IncomingBlob)."""
        return IncomingBlob(self)

    def open_download(self, key: str) -> tuple[Path, int]:
        """The partial file of download ``key``, opened and flock'ed (kept if it exists, to resume)."""
        path = self.downloads_dir / f"{key}.partial"
        while True:
            try:
                self.downloads_dir.mkdir(exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise _storage_error(exc, self.downloads_dir) from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
            # While we waited for the lock, the holder may have finished and moved this file into
            # blobs/ (or gc removed it): that inode is no longer the partial, so never write to it.
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                return path, fd
            os.close(fd)

    def free_bytes(self) -> int:
        return _free_bytes(self.tmp_dir)

    def _new_staging_file(self, suffix: str) -> tuple[Path, int]:
        path = self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _storage_error(exc, self.tmp_dir) from exc
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd

    def _try_reflink(self, src_fd: int, size: int, on_progress: ProgressCallback | None) -> StagedBlob | None:
        path, fd = self._new_staging_file(".partial")
        try:
            fcntl.ioctl(fd, _FICLONE, src_fd)
        except OSError:
            path.unlink()
            os.close(fd)
            return None
        return self._finish_linked(path, fd, size, "reflink", on_progress)

    def _try_hardlink(
        self, source: Path, size: int, on_progress: ProgressCallback | None
    ) -> StagedBlob | None:
        path = self.tmp_dir / f"{uuid.uuid4().hex}.link"
        try:
            os.link(source, path)
        except OSError:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        linked = _content_stat(os.fstat(fd))
        staged = self._finish_linked(path, fd, size, "hardlink", on_progress)
        staged._linked = linked
        return staged

    def _finish_linked(
        self, path: Path, fd: int, size: int, method: StageMethod, on_progress: ProgressCallback | None
    ) -> StagedBlob:
        return self._fill(StagedBlob(path, "", size, method, fd), lambda: _hash_fd(fd, on_progress))

    def _copy(self, src_fd: int, size: int, on_progress: ProgressCallback | None) -> StagedBlob:
        free = _free_bytes(self.tmp_dir)
        if size > free:
            raise DiskFull(
                f"not enough space under {self.data_dir}: the file needs {size} bytes, {free} are free"
            )
        path, fd = self._new_staging_file(".partial")
        return self._fill(
            StagedBlob(path, "", size, "copy", fd), lambda: _copy_and_hash(src_fd, fd, on_progress)
        )

    def _fill(self, staged: StagedBlob, write_and_hash: Callable[[], tuple[str, int]]) -> StagedBlob:
        """Run the staging step, fsync, and record the digest; on any failure the staging file goes."""
        try:
            hex_digest, staged.size = write_and_hash()
            os.fsync(staged._fd)
        except OSError as exc:
            staged.close()
            raise _storage_error(exc, self.tmp_dir) from exc
        except BaseException:
            staged.close()
            raise
        staged.digest = f"sha256:{hex_digest}"
        return staged

    def place(self, staged: StagedBlob) -> Path:
        """Make a staged blob visible under its digest. Call while holding ``placing()``."""
        target = self.path(staged.digest)
        try:
            if target.exists():
                staged.close()
                return target
            if staged._linked is not None and _content_stat(os.fstat(staged._fd)) != staged._linked:
                staged.close()
                raise SourceUnreadable(
                    "the file was written to while it was imported (it is hard-linked, not copied)",
                    hint="import it again once nothing writes to it",
                )
            os.chmod(staged.path, 0o444)  # a hard-linked source too: edits now need a chmod first
            os.rename(staged.path, target)
            _fsync_dir(self.blobs_dir)
            if staged.method == "hardlink":
                staged.link_stat = _inode_stat(os.fstat(staged._fd))
        except OSError as exc:
            staged.close()
            raise _storage_error(exc, self.blobs_dir) from exc
        os.close(staged._fd)
        staged._fd = -1
        return target

    # -- verification, deletion, garbage -------------------------------------------------------

    def link_stat(self, digest: str) -> str:
        """The blob's inode identity now (what a write through a hard link to it would change)."""
        return _inode_stat(os.stat(self.path(digest)))

    def hash_blob(self, digest: str) -> str:
        """Re-hash a blob; returns the digest its content has now."""
        fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        try:
            hex_digest, _ = _hash_fd(fd, None)
        finally:
            os.close(fd)
        return f"sha256:{hex_digest}"

    def quarantine(self, digest: str) -> Path:
        target = self.quarantine_dir / digest.removeprefix("sha256:")
        os.replace(self.path(digest), target)
        _fsync_dir(self.blobs_dir)
        return target

    def remove(self, digest: str) -> int:
        """Delete a blob file; returns the bytes freed (0 when it was already gone, or when a
        hard-linked source still holds them)."""
        path = self.path(digest)
        try:
            info = path.stat()
            path.unlink()
        except FileNotFoundError:
            return 0
        return info.st_size if info.st_nlink == 1 else 0

    def blob_files(self) -> dict[str, int]:
        """Every blob on disk, digest → size."""
        found: dict[str, int] = {}
        for entry in os.scandir(self.blobs_dir):
            if entry.is_file(follow_symlinks=False):
                found[f"sha256:{entry.name}"] = entry.stat(follow_symlinks=False).st_size
        return found

    def remove_stale_staging(self) -> tuple[int, int]:
        """Delete staging files and download partials whose owner is gone, with their part state,
        and pull locks nobody holds; returns (partial files, bytes really freed on the disk)."""
        files = freed = 0
        candidates = [
            entry for entry in os.scandir(self.tmp_dir) if entry.name.endswith((".partial", ".link"))
        ]
        if self.downloads_dir.is_dir():
            candidates += [
                entry
                for entry in os.scandir(self.downloads_dir)
                if entry.name.endswith((".partial", ".lock"))
            ]
        for entry in candidates:
            removed = _remove_unheld(Path(entry.path))
            if removed is None or entry.name.endswith(".lock"):
                continue
            files += 1
            freed += removed
            for leftover in (".state.json", ".state.tmp"):
                freed += _remove_allocated(Path(entry.path.removesuffix(".partial") + leftover))
        if self.downloads_dir.is_dir():
            # Part state whose partial is gone: a partial is always created before its state.
            for entry in os.scandir(self.downloads_dir):
                for suffix in (".state.json", ".state.tmp"):
                    stem = entry.name.removesuffix(suffix)
                    if stem != entry.name and not (self.downloads_dir / f"{stem}.partial").exists():
                        freed += _remove_allocated(Path(entry.path))
        return files, freed


def _allocated(info: os.stat_result) -> int:
    """The bytes that unlinking this name gives back: a sparse or preallocated file's blocks, not
    its nominal size, and nothing while another name (a hard-linked source) still holds them."""
    return info.st_blocks * 512 if info.st_nlink <= 1 else 0


def _remove_allocated(path: Path) -> int:
    try:
        info = os.stat(path)
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return _allocated(info)


def _remove_unheld(path: Path) -> int | None:
    """Unlink a file nobody holds an flock on; returns the bytes freed, or None when it was kept."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # an import, download or pull in flight still holds it
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            return None  # replaced since we opened it: that file belongs to someone else
        os.unlink(path)
        info = os.fstat(fd)
        return info.st_blocks * 512 if info.st_nlink == 0 else 0
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def open_source(source: Path) -> int:
    """Open a file to import, turning the ways that fails into errors that say what to do."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{source} does not exist") from exc
    except PermissionError as exc:
        raise SourceUnreadable(f"{source} cannot be read: permission denied") from exc
    except OSError as exc:
        raise SourceUnreadable(f"{source} cannot be opened: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise SourceUnreadable(f"{source} is {what}", hint="pass the model file itself")
    return fd


def _content_stat(info: os.stat_result) -> tuple[int, int]:
    return info.st_size, info.st_mtime_ns


def _inode_stat(info: os.stat_result) -> str:
    # ctime moves on any write, chmod or link-count change, and cannot be set back by a caller.
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int, on_progress: ProgressCallback | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    total = 0
    while count := os.readv(fd, [buffer]):
        digest.update(view[:count])
        total += count
        if on_progress is not None:
            on_progress(total)
    return digest.hexdigest(), total


def _copy_and_hash(src_fd: int, dst_fd: int, on_progress: ProgressCallback | None) -> tuple[str, int]:
    """Copy while hashing, in the same pass; the digest is of the bytes written, as written.

    Where the kernel can copy between the two files (``copy_file_range``: one copy inside the
    kernel, or shared extents on a filesystem that can), chunk N+1 is copied while a second
    thread hashes chunk N as read back from the destination, so the digest is of what was written;
    otherwise chunk N is read into a buffer, hashed on the second thread while it is written and
    chunk N+1 read (hashlib releases the GIL). Either way the whole takes about as long as the
    slower of copying and hashing, not their sum.

    Each hashed chunk is handed to the kernel's writeback at once (FADV_DONTNEED starts it
    without waiting), so the fsync at the end finds little left to write instead of the whole
    file: the disk works while we copy, not after."""
    size = os.fstat(src_fd).st_size
    try:
        first = os.copy_file_range(src_fd, dst_fd, CHUNK_BYTES)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
        first = 0
    if first == 0 and size > 0:  # refused, or a filesystem that copies nothing this way
        hex_digest, total = _read_write_and_hash(src_fd, dst_fd, on_progress)
    else:
        hex_digest, total = _copy_range_and_hash(src_fd, dst_fd, first, on_progress)
    if total != size:
        raise SourceUnreadable(f"the file changed while it was imported: {size} bytes became {total}")
    return hex_digest, total


def _copy_range_and_hash(
    src_fd: int, dst_fd: int, first: int, on_progress: ProgressCallback | None
) -> tuple[str, int]:
    digest = hashlib.sha256()
    buffer = bytearray(READ_BACK_BYTES)  # the hash thread's, for every chunk: no fresh pages per chunk
    total = 0
    count = first
    # The copier runs up to COPY_AHEAD chunks ahead of the hash thread (which takes them in order):
    # in lockstep, each chunk cost the slower of its copy and its hash, and on two cores the two
    # slow down in turns (a 2 GiB import: 2.30 s in lockstep, 1.98 s ahead; bench/ingest.py).
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash") as hasher:
        while count:
            pending.append(hasher.submit(_hash_written, dst_fd, digest, total, count, buffer))
            total += count
            if on_progress is not None:
                on_progress(total)
            if len(pending) >= COPY_AHEAD:
                pending.popleft().result()
            count = os.copy_file_range(src_fd, dst_fd, CHUNK_BYTES)
        while pending:
            pending.popleft().result()
    return digest.hexdigest(), total


def _hash_written(fd: int, digest: hashlib._Hash, offset: int, count: int, buffer: bytearray) -> None:
    """Hash bytes just written, read back from the page cache into ``buffer``, then start their
    writeback. (Read, not mapped: a read error on a mapping would be a SIGBUS that kills the server.)"""
    _hash_range(fd, digest, offset, count, buffer)
    os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)


def _hash_range(fd: int, digest: hashlib._Hash, offset: int, count: int, buffer: bytearray) -> None:
    view = memoryview(buffer)
    end = offset + count
    while offset < end:
        read = os.preadv(fd, [view[: min(len(buffer), end - offset)]], offset)
        if read == 0:
            raise StorageFailure(f"the staging file ended {end - offset} bytes early")
        digest.update(view[:read])
        offset += read


def _read_write_and_hash(src_fd: int, dst_fd: int, on_progress: ProgressCallback | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    buffers = [bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)]
    total = 0
    pending: Future[None] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash") as hasher:
        index = 0
        while True:
            buffer = buffers[index % 2]
            count = os.readv(src_fd, [buffer])
            if pending is not None:
                pending.result()
            if count == 0:
                break
            chunk = memoryview(buffer)[:count]
            pending = hasher.submit(digest.update, chunk)
            _write_all(dst_fd, chunk)
            os.posix_fadvise(dst_fd, total, count, os.POSIX_FADV_DONTNEED)
            total += count
            index += 1
            if on_progress is not None:
                on_progress(total)
    return digest.hexdigest(), total


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]
