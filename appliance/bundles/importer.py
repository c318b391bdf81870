"""Reading a bundle in two phases: receive and verify every blob, then register the models.

Phase one reads the entries in whatever order they come (a tar written by another tool need not
put ``index.json`` first; ours puts it last). Each ``blobs/sha256/<hex>`` entry is hashed as it
is read: a large one streams into the cache's staging and is placed only when it matches its
name; a small one (manifests, config files) is held in memory, within a cap. A blob already in
the cache is skipped unread (seeked over in a tar file, read past on a pipe): that is how an
import killed halfway resumes. Blobs placed but not yet registered are only cache content, which
no model shows; the shared cache lock held throughout keeps ``gc`` from removing them meanwhile.

Phase two starts only when the whole bundle has been read: it checks the index, every manifest
and every layer (present and verified), every name for conflicts, and only then registers each
model with all its files in one transaction.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from appliance.audit import Context, audited
from appliance.bundles.layout import (
    MAX_JSON_BYTES,
    BundleModel,
    blob_entry,
    parse_index,
    parse_layout,
    parse_manifest,
)
from appliance.errors import (
    BundleDamaged,
    InvalidInput,
    ModelExists,
    NotABundle,
    SourceNotFound,
    SourceUnreadable,
)
from appliance.models.service import ModelService
from appliance.store.base import Model

__all__ = ["ImportReport", "ImportedModel", "import_bundle"]

CHUNK_BYTES = 1024 * 1024
SMALL_BYTES = 1024 * 1024  # held in memory up to this size each...
SMALL_TOTAL_BYTES = 64 * 1024 * 1024  # ...and this much in all; more goes to the cache
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")

Progress = Callable[[int, int | None], None]  # bytes read so far, and in all when known


@dataclass(frozen=True)
class ImportedModel:
    model: Model
    added: bool  # False: it was there already with these files


@dataclass(frozen=True)
class ImportReport:
    models: tuple[ImportedModel, ...]
    blobs_received: int
    bytes_received: int
    blobs_skipped: int  # already in the cache (an earlier run, or another model's)
    bytes_skipped: int


@dataclass
class _Entry:
    name: str
    size: int
    offset: int  # where its content starts in the source (for progress)
    open: Callable[[], IO[bytes]]


@dataclass
class _Received:
    layout: bytes | None = None
    index: bytes | None = None
    small: dict[str, bytes] = field(default_factory=dict)
    small_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0


def import_bundle(
    models: ModelService,
    source: Path | IO[bytes],
    context: Context,
    *,
    label: str,
    on_progress: Progress | None = None,
) -> ImportReport:
    """Import a bundle from a directory, a tar file, or a tar stream (stdin, an upload)."""
    with audited(models.store, context, action="bundles.import", target=label) as note, ExitStack() as stack:
        # Held throughout: nothing placed here is collected by gc before it is registered.
        stack.enter_context(models.cache.placing())
        entries, total = _open(source, stack)
        received = _receive(models, entries, total, on_progress)
        bundle = _check(models, received)
        report = _register(models, bundle, received, context, label=label)
        note.bytes = received.received_bytes
        note.detail.update(
            models=[str(found.model.name) for found in report.models],
            added=[str(found.model.name) for found in report.models if found.added],
            blobs_received=report.blobs_received,
            blobs_skipped=report.blobs_skipped,
        )
        return report


# -- sources -----------------------------------------------------------------------------------


def _open(source: Path | IO[bytes], stack: ExitStack) -> tuple[Iterator[_Entry], int | None]:
    if not isinstance(source, Path):
        return _tar_entries(stack.enter_context(_tar(source, "the stream", "r|"))), None
    try:
        info = source.stat()
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{source} does not exist") from exc
    except OSError as exc:
        raise SourceUnreadable(f"{source} cannot be read: {exc.strerror or exc}") from exc
    if source.is_dir():
        if not (source / "oci-layout").is_file():
            raise NotABundle(f"{source} has no oci-layout file: it is not an OCI image layout")
        return _directory_entries(source)
    try:
        handle = stack.enter_context(source.open("rb"))
    except OSError as exc:
        raise SourceUnreadable(f"{source} cannot be read: {exc.strerror or exc}") from exc
    return _tar_entries(stack.enter_context(_tar(handle, str(source), "r:"))), info.st_size


def _tar(handle: IO[bytes], label: str, mode: str) -> tarfile.TarFile:
    try:
        tar: tarfile.TarFile = tarfile.open(fileobj=handle, mode=mode)  # type: ignore[call-overload]  # noqa: SIM115 (the caller's ExitStack closes it)
        return tar
    except (tarfile.TarError, EOFError) as exc:
        raise NotABundle(f"{label} is neither a directory nor a tar of one ({exc})") from exc
    except OSError as exc:
        raise SourceUnreadable(f"{label} cannot be read: {exc.strerror or exc}") from exc


def _tar_entries(tar: tarfile.TarFile) -> Iterator[_Entry]:
    previous = "the start of the tar"
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError) as exc:
            raise BundleDamaged(f"the bundle is truncated or damaged after {previous} ({exc})") from exc
        if member is None:
            return
        if not member.isfile():
            continue
        name = member.name.removeprefix("./")

        def opener(member: tarfile.TarInfo = member) -> IO[bytes]:
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file always has one
            return handle

        yield _Entry(name, member.size, member.offset_data, opener)
        previous = name


def _directory_entries(root: Path) -> tuple[Iterator[_Entry], int]:
    names = ["oci-layout", "index.json"]
    blobs = root / "blobs" / "sha256"
    if blobs.is_dir():
        names += sorted(f"blobs/sha256/{entry.name}" for entry in os.scandir(blobs) if entry.is_file())
    sizes: list[tuple[Path, str, int]] = []
    for name in names:
        try:
            sizes.append((root / name, name, (root / name).stat().st_size))
        except FileNotFoundError:
            continue  # index.json: phase two says it is missing

    def entries() -> Iterator[_Entry]:
        offset = 0
        for path, name, size in sizes:
            yield _Entry(name, size, offset, _opener(path))
            offset += size

    return entries(), sum(size for _, _, size in sizes)


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


# -- phase one: receive and verify ---------------------------------------------------------------


def _receive(
    models: ModelService, entries: Iterator[_Entry], total: int | None, on_progress: Progress | None
) -> _Received:
    received = _Received()
    for entry in entries:
        if entry.name in ("oci-layout", "index.json"):
            content = _read_small(entry, limit=MAX_JSON_BYTES)
            if entry.name == "oci-layout":
                received.layout = content
            else:
                received.index = content
        elif match := _BLOB.match(entry.name):
            digest = f"sha256:{match.group(1)}"
            if digest in received.small:
                continue
            if models.has_blob(digest):
                received.skipped += 1
                received.skipped_bytes += entry.size
            elif entry.size <= SMALL_BYTES and received.small_bytes + entry.size <= SMALL_TOTAL_BYTES:
                content = _read_small(entry, limit=SMALL_BYTES)
                if f"sha256:{hashlib.sha256(content).hexdigest()}" != digest:
                    raise BundleDamaged(f"{entry.name} does not match its digest: the bundle was altered")
                received.small[digest] = content
                received.small_bytes += len(content)
            else:
                _receive_blob(models, entry, digest, on_progress, total)
                received.received += 1
                received.received_bytes += entry.size
        if on_progress is not None:
            on_progress(entry.offset + entry.size, total)
    return received


def _read_small(entry: _Entry, *, limit: int) -> bytes:
    if entry.size > limit:
        raise BundleDamaged(
            f"{entry.name} is {entry.size} bytes, more than the {limit} a bundle's JSON may be"
        )
    with _reading(entry) as handle:
        content = _read(handle, entry, entry.size)
    if len(content) != entry.size:
        raise BundleDamaged(f"{entry.name} is cut short: the bundle is truncated")
    return content


def _receive_blob(
    models: ModelService, entry: _Entry, digest: str, on_progress: Progress | None, total: int | None
) -> None:
    done = 0
    with models.receive_blob() as incoming, _reading(entry) as handle:
        while done < entry.size:
            chunk = _read(handle, entry, min(CHUNK_BYTES, entry.size - done))
            if not chunk:
                raise BundleDamaged(f"{entry.name} is cut short: the bundle is truncated")
            incoming.write(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(entry.offset + done, total)
        try:
            incoming.finish(digest)
        except InvalidInput as exc:
            raise BundleDamaged(f"{entry.name} does not match its digest: the bundle was altered") from exc


@contextmanager
def _reading(entry: _Entry) -> Iterator[IO[bytes]]:
    """Open an entry's content, turning a source that fails into an error naming the entry."""
    try:
        handle = entry.open()
    except OSError as exc:
        raise SourceUnreadable(f"{entry.name} cannot be read: {exc.strerror or exc}") from exc
    with handle:
        yield handle


def _read(handle: IO[bytes], entry: _Entry, count: int) -> bytes:
    try:
        return handle.read(count)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleDamaged(f"{entry.name} is cut short: the bundle is truncated ({exc})") from exc
    except OSError as exc:
        raise SourceUnreadable(f"{entry.name} cannot be read: {exc.strerror or exc}") from exc


# -- phase two: check everything, then register ----------------------------------------------------


def _content(models: ModelService, received: _Received, digest: str) -> bytes:
    """A small blob's bytes: from memory, or from the cache where an earlier run put it."""
    if digest in received.small:
        return received.small[digest]
    if not models.has_blob(digest):
        raise BundleDamaged(f"{blob_entry(digest)} is missing: the bundle is truncated or incomplete")
    path = models.blob_path(digest)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleDamaged(
            f"{blob_entry(digest)} is larger than the {MAX_JSON_BYTES} bytes a manifest may be"
        )
    return path.read_bytes()


def _check(models: ModelService, received: _Received) -> list[BundleModel]:
    if received.layout is None:
        raise NotABundle("the bundle has no oci-layout entry: it is not an OCI image layout")
    parse_layout(received.layout)
    if received.index is None:
        raise BundleDamaged("index.json is missing: the bundle is truncated or incomplete")
    bundle: list[BundleModel] = []
    names: set[str] = set()
    for descriptor in parse_index(received.index):
        found = parse_manifest(_content(models, received, descriptor.digest), descriptor)
        if str(found.name) in names:
            raise BundleDamaged(f"the bundle holds {found.name} twice")
        names.add(str(found.name))
        for artifact in found.artifacts:
            if artifact.digest not in received.small and not models.has_blob(artifact.digest):
                raise BundleDamaged(
                    f"{blob_entry(artifact.digest)} ({found.name}: {artifact.filename}) is missing:"
                    " the bundle is truncated or incomplete"
                )
        bundle.append(found)
    for found in bundle:  # every conflict before any registration
        for artifact in found.artifacts:
            try:
                models.check_conflict(found.name, artifact.filename, artifact.digest)
            except ModelExists as exc:
                raise ModelExists(
                    f"{exc.message}; the bundle's {found.name} has other content",
                    hint="remove the model here first (`appliance models rm NAME`), or export it from the"
                    " other side under another name; nothing from the bundle was registered",
                ) from exc
    return bundle


def _register(
    models: ModelService, bundle: list[BundleModel], received: _Received, context: Context, *, label: str
) -> ImportReport:
    for found in bundle:  # small layers (config files) go into the cache like the rest
        for artifact in found.artifacts:
            content = received.small.get(artifact.digest)
            if content is not None and not models.has_blob(artifact.digest):
                with models.receive_blob() as incoming:
                    incoming.write(content)
                    incoming.finish(artifact.digest)
                received.received += 1
                received.received_bytes += len(content)
    imported = [
        ImportedModel(
            *models.register_artifacts(found.name, list(found.artifacts), context=context, source=label)
        )
        for found in bundle
    ]
    return ImportReport(
        models=tuple(imported),
        blobs_received=received.received,
        bytes_received=received.received_bytes,
        blobs_skipped=received.skipped,
        bytes_skipped=received.skipped_bytes,
    )
