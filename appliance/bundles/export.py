"""Writing a bundle: its entries in order, as a tar stream or into a directory.

Blobs come first, straight from the cache (re-hashed as they are read, so a blob damaged on disk
is never shipped), and ``index.json`` last: a bundle cut short has no index and cannot pass for a
whole one. The tar is written by hand, header by header, so the same generator feeds a file,
stdout and an HTTP response alike without a temp copy.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.bundles.layout import (
    EMPTY_CONFIG,
    Descriptor,
    blob_entry,
    index_document,
    layout_document,
    manifest_for,
)
from appliance.errors import InvalidInput, StorageFailure
from appliance.store.base import Model

__all__ = ["CHUNK_BYTES", "Entry", "bundle_entries", "tar_chunks", "tar_size", "write_directory"]

CHUNK_BYTES = 1024 * 1024
BLOCK = 512


@dataclass(frozen=True)
class Entry:
    """One file of the layout: its path inside it, its size and a reader of its chunks."""

    name: str
    size: int
    chunks: Callable[[], Iterator[bytes]]


def _memory(content: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter((content,))


def _cached_blob(path: Path, digest: str, size: int) -> Callable[[], Iterator[bytes]]:
    def read() -> Iterator[bytes]:
        hasher = hashlib.sha256()
        total = 0
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(min(CHUNK_BYTES, size - total)):
                    hasher.update(chunk)
                    total += len(chunk)
                    yield chunk
        except OSError as exc:
            raise StorageFailure(f"cannot read the blob {digest}: {exc.strerror or exc}") from exc
        if total != size or f"sha256:{hasher.hexdigest()}" != digest:
            raise StorageFailure(
                f"the cached blob {digest} no longer matches its digest; the bundle was not finished",
                hint="run `appliance models verify`, then pull or import the model again",
            )

    return read


def bundle_entries(models: list[Model], blob_path: Callable[[str], Path]) -> list[Entry]:
    """The layout's entries, each blob once: ``oci-layout``, the blobs, ``index.json`` last."""
    entries = [Entry("oci-layout", len(layout := layout_document()), _memory(layout))]
    seen: set[str] = set()

    def add_blob(digest: str, size: int, chunks: Callable[[], Iterator[bytes]]) -> None:
        if digest not in seen:
            seen.add(digest)
            entries.append(Entry(blob_entry(digest), size, chunks))

    manifests: list[tuple[Model, Descriptor]] = []
    empty = Descriptor.of(EMPTY_CONFIG)
    add_blob(empty.digest, empty.size, _memory(EMPTY_CONFIG))
    for model in models:
        for artifact in model.artifacts:
            add_blob(
                artifact.digest,
                artifact.size_bytes,
                _cached_blob(blob_path(artifact.digest), artifact.digest, artifact.size_bytes),
            )
        manifest = manifest_for(model)
        descriptor = Descriptor.of(manifest)
        add_blob(descriptor.digest, descriptor.size, _memory(manifest))
        manifests.append((model, descriptor))
    entries.append(Entry("index.json", len(index := index_document(manifests)), _memory(index)))
    return entries


def _header(name: str, size: int, *, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0  # the same models make the same bytes
    return info.tobuf(tarfile.PAX_FORMAT)  # PAX: sizes past ustar's 8 GiB


def tar_size(entries: list[Entry]) -> int:
    """The exact length of ``tar_chunks(entries)`` (an HTTP download's Content-Length)."""
    size = len(_header("blobs/", 0, directory=True)) + len(_header("blobs/sha256/", 0, directory=True))
    for entry in entries:
        size += len(_header(entry.name, entry.size)) + entry.size + (-entry.size % BLOCK)
    return size + 2 * BLOCK


def tar_chunks(entries: list[Entry], *, on_progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The tar of the layout, chunk by chunk (``on_progress`` gets the blob bytes written so far)."""
    yield _header("blobs/", 0, directory=True) + _header("blobs/sha256/", 0, directory=True)
    done = 0
    for entry in entries:
        yield _header(entry.name, entry.size)
        for chunk in entry.chunks():
            done += len(chunk)
            yield chunk
            if on_progress is not None:
                on_progress(done)
        if remainder := entry.size % BLOCK:
            yield b"\0" * (BLOCK - remainder)
    yield b"\0" * (2 * BLOCK)


def write_directory(
    entries: list[Entry], target: Path, *, on_progress: Callable[[int], None] | None = None
) -> None:
    """Write the layout into ``target`` (absent or empty); ``index.json`` is renamed into place
    last, so a directory whose export died has no index."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise InvalidInput(
                f"{target} is not empty",
                hint="export into a new directory, or to a path ending in .tar",
            )
        (target / "blobs" / "sha256").mkdir(parents=True)
        done = 0
        for entry in entries:
            final = target / entry.name
            staging = (
                final.with_name(f".{final.name}.{uuid.uuid4().hex}") if entry.name == "index.json" else final
            )
            with staging.open("wb") as handle:
                for chunk in entry.chunks():
                    handle.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done)
                handle.flush()
                os.fsync(handle.fileno())
            if staging != final:
                os.rename(staging, final)
    except OSError as exc:
        raise StorageFailure(f"cannot write the bundle under {target}: {exc.strerror or exc}") from exc
