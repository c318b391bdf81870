"""Model management: import, list, show, remove, verify, pin, evict and collect garbage.

The CLI and the API call these methods and nothing below them. Every mutation is audited.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.audit import Context, audited
from appliance.errors import (
    CacheFull,
    ModelExists,
    ModelNotFound,
    ModelNotLoadable,
    SourceUnreadable,
    StorageFailure,
)
from appliance.models.formats import ONE_PER_MODEL, detect_format, read_capabilities
from appliance.models.gguf import read_gguf_header
from appliance.models.layers import LAYERS, ModelLayers, read_layers
from appliance.models.listing import ListCache, ModelPage, read_page
from appliance.names import ModelName, name_from_filename
from appliance.preferences import EVICT_POLICY, MAX_BYTES, PreferenceService
from appliance.settings import Settings
from appliance.store.base import Artifact, Model, ModelSummary, NewArtifact, Store
from appliance.store.cache import BlobCache, IncomingBlob, ProgressCallback, StagedBlob, open_source

__all__ = [
    "BlobSource",
    "GcReport",
    "ImportResult",
    "Model",
    "ModelPage",
    "ModelService",
    "ModelSummary",
    "VerifyResult",
]

HEADER_BYTES = 64
_REPLACE_HINT = (
    'import it with --replace (API: "replace": true) to put it in place of the old file,'
    " or import or pull it under another --name"
)


@dataclass(frozen=True)
class ImportResult:
    model: Model
    digest: str
    size_bytes: int
    method: str  # copy, reflink or hardlink
    added: bool  # False when the same content was already registered under this name
    evicted: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()  # digests of the files this import took the place of


@dataclass(frozen=True)
class VerifyResult:
    digest: str
    models: tuple[str, ...]
    ok: bool
    detail: str


@dataclass(frozen=True)
class GcReport:
    orphan_blobs: int = 0
    stale_partials: int = 0
    freed_bytes: int = 0
    evicted: tuple[str, ...] = ()
    missing: tuple[str, ...] = field(default_factory=tuple)


class BlobSource(Protocol):
    """Where a blob comes from that the store registers but this server's cache lacks: another
    server sharing the store, or its source again (``cluster/peers.py``)."""

    def bring(self, model: Model, artifacts: Sequence[Artifact]) -> None:
        """Place the artifacts' blobs in this cache, verified; BlobFetching while they are still on
        their way, ModelNotPresent when nothing can bring them."""
        ...

    def shared(self) -> bool:
        """Whether other servers share the store, so a blob missing here may be in their caches."""
        ...


def serves(artifact: Artifact) -> bool:
    """Whether inference reads the artifact: the GGUF the engine loads, or a layer (``/api/create``)."""
    return artifact.format == "gguf" or (artifact.format == "file" and artifact.filename in LAYERS)


class ModelService:
    def __init__(
        self, settings: Settings, store: Store, cache: BlobCache, *, preferences: PreferenceService
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.preferences = preferences
        self._lists = ListCache(store)
        self.blob_source: BlobSource | None = None  # set by the server that serves (cluster/peers.py)

    # -- reading -----------------------------------------------------------------------------

    def list_models(self) -> list[Model]:
        return self.store.list_models()

    def page(self, *, limit: int | None = None, cursor: str | None = None) -> ModelPage[Model]:
        """Up to ``limit`` models (every one when None) past ``cursor``; InvalidInput for a bad either."""
        return read_page(
            lambda after, most: self.store.list_models(after=after, limit=most), limit=limit, cursor=cursor
        )

    def summaries(self, *, limit: int | None = None, cursor: str | None = None) -> ModelPage[ModelSummary]:
        """``page`` for a table of models: without their artifacts' rows or whole capabilities."""
        return read_page(
            lambda after, most: self.store.list_model_summaries(after=after, limit=most),
            limit=limit,
            cursor=cursor,
        )

    def cached_list(
        self, key: str, render: Callable[[list[ModelSummary]], bytes], *, variant: str = ""
    ) -> bytes:
        """``render`` of the GGUF models' summaries, cached under ``key`` until the registry (or
        ``variant``: what else ``render`` puts in) changes."""
        return self._lists.answer(key, render, gguf_only=True, variant=variant)

    def has_loadable(self) -> bool:
        return self.store.has_loadable_model()

    def get(self, name: str | ModelName) -> Model:
        model_name = name if isinstance(name, ModelName) else ModelName.parse(name)
        model = self.store.get_model(model_name)
        if model is None:
            raise ModelNotFound(f"model {model_name} not found")
        return model

    def max_bytes(self) -> int | None:
        return self.preferences.effective(MAX_BYTES)

    def evict_policy(self) -> str:
        return self.preferences.effective(EVICT_POLICY)

    def cache_usage(self) -> dict[str, int | None]:
        return {"used_bytes": self._held_bytes(), "max_bytes": self.max_bytes()}

    # -- blobs -------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return self.cache.has(digest)

    def bring_blobs(self, model: Model) -> None:
        """Make the blobs that serving ``model`` reads (its GGUF, its layers) present in this cache:
        one another server sharing the store registered is fetched from it, or pulled again, and
        only placed once whole and verified (BlobFetching while it comes, ModelNotPresent when
        nothing can bring it)."""
        missing = [
            a for a in model.artifacts if serves(a) and a.state == "ok" and not self.cache.has(a.digest)
        ]
        if missing:
            assert self.blob_source is not None, "Runtime.open sets it"
            self.blob_source.bring(model, missing)

    def blob_path(self, digest: str) -> Path:
        """Where a blob lives on disk (for display, as in a Modelfile's FROM line)."""
        return self.cache.path(digest)

    def receive_blob(self) -> IncomingBlob:
        """Staging for content that arrives in pieces (an upload); ``finish(digest)`` places it.
        The blob is not a model by itself: ``gc`` removes it unless a model comes to use it."""
        return self.cache.receive()

    def chat_template(self, model: Model) -> str:
        """The model's chat template (Jinja): its template layer (``/api/create``), else the one in
        its GGUF header; "" when it has none."""
        layered = self.layers(model).template
        if layered is not None:
            return layered
        artifact = next((a for a in model.artifacts if a.format == "gguf"), None)
        if artifact is None or not model.capabilities.get("chat_template"):
            return ""
        if not self.has_blob(artifact.digest):
            return ""
        return _read_chat_template(self.cache.path(artifact.digest))

    def layers(self, model: Model) -> ModelLayers:
        """The model's Ollama layers (template, system, messages, params) from ``/api/create``."""
        return read_layers(model, self.cache)

    # -- import ------------------------------------------------------------------------------

    def import_file(
        self,
        source: Path,
        context: Context,
        *,
        name: str | None = None,
        fmt: str | None = None,
        allow_link: bool = True,
        hard_link: bool = False,
        replace: bool = False,
        expected_digest: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ImportResult:
        """Import a local file into the cache and register it under ``name`` (default: from the filename).

        ``allow_link=False`` always copies; ``hard_link`` hard-links where no reflink is possible
        (see ``BlobCache.stage``). ``replace`` puts the file in place of the model's file of the
        same name or, for a GGUF, of its GGUF; without it such an import raises ModelExists.
        """
        if "\0" in str(source):  # the OS cannot even look such a path up (Python raises ValueError)
            raise SourceUnreadable(f"{str(source)!r} contains a NUL byte", hint="pass the file's real path")
        source = Path(os.path.abspath(source))
        model_name = ModelName.parse(name) if name else name_from_filename(source.name)
        with audited(self.store, context, action="models.import", target=str(model_name)) as note:
            note.detail["source"] = str(source)
            header, size = _read_header(source)
            fmt = detect_format(header, size=size, filename=source.name, requested=fmt)
            note.detail["format"] = fmt
            source_uri = f"file:{source}"
            self._check_budget(size, keep=model_name)
            staged = self.cache.stage(
                source,
                allow_link=allow_link,
                hard_link=hard_link,
                expected_digest=expected_digest,
                on_progress=on_progress,
            )
            note.bytes = staged.size
            note.detail.update(digest=staged.digest, method=staged.method)
            model, added, evicted, replaced = self._register(
                staged,
                model_name,
                filename=source.name,
                fmt=fmt,
                source_uri=source_uri,
                context=context,
                replace=replace,
            )
            note.detail["added"] = added
            if replaced:
                note.detail["replaced"] = list(replaced)
            return ImportResult(
                model, staged.digest, staged.size, staged.method, added, tuple(evicted), tuple(replaced)
            )

    def register_staged(
        self,
        staged: StagedBlob,
        model_name: ModelName,
        *,
        filename: str,
        fmt: str,
        source_uri: str,
        context: Context,
    ) -> tuple[Model, bool, list[str]]:
        """Place a staged blob and register it under ``model_name``; the staged file is gone afterwards.

        Raises ModelExists when the model holds ``filename``, or (for a GGUF) another GGUF, with
        other content."""
        model, added, evicted, _ = self._register(
            staged, model_name, filename=filename, fmt=fmt, source_uri=source_uri, context=context
        )
        return model, added, evicted

    def register_artifacts(
        self,
        model_name: ModelName,
        artifacts: list[NewArtifact],
        *,
        context: Context,
        source: str,
    ) -> tuple[Model, bool]:
        """Register blobs already in the cache as one model, in one transaction: it appears with
        all its files or not at all. Their formats are checked against their content first.

        Returns the model and whether anything was added (False: it was there with these files).
        Raises ModelExists when ``model_name`` holds one of the filenames, or a GGUF, with other
        content; CacheFull when the new blobs do not fit the budget."""
        with audited(self.store, context, action="models.import", target=str(model_name)) as note:
            note.detail.update(source=source, digests=[artifact.digest for artifact in artifacts])
            capabilities: dict[str, Any] = {}
            for artifact in sorted(artifacts, key=lambda artifact: artifact.format == "gguf"):
                self._conflicts(
                    model_name,
                    artifact.filename,
                    digest=artifact.digest,
                    fmt=artifact.format,
                    source_uri=artifact.source_uri,
                )
                path = self.cache.path(artifact.digest)
                header, size = _read_header(path)
                if artifact.format != "file":
                    detect_format(header, size=size, filename=artifact.filename, requested=artifact.format)
                # the GGUF's facts last, so they win where a config file's say otherwise
                capabilities.update(read_capabilities(path, artifact.format))
            known = self.store.get_model(model_name)
            held = {artifact.digest for artifact in known.artifacts} if known is not None else set()
            self._check_budget(
                sum(artifact.size_bytes for artifact in artifacts if artifact.digest not in held),
                keep=model_name,
            )
            with self.cache.placing():
                missing = [artifact.filename for artifact in artifacts if not self.cache.has(artifact.digest)]
                if missing:
                    raise StorageFailure(
                        f"the blobs of {', '.join(missing)} left the cache before they were registered"
                    )
                model, added = self.store.add_artifacts(
                    model_name,
                    artifacts,
                    capabilities=capabilities,
                    actor=context.actor,
                    sole_formats=ONE_PER_MODEL,
                )
            note.bytes = sum(artifact.size_bytes for artifact in artifacts)
            note.detail["added"] = added
            return model, added

    def _register(
        self,
        staged: StagedBlob,
        model_name: ModelName,
        *,
        filename: str,
        fmt: str,
        source_uri: str,
        context: Context,
        replace: bool = False,
    ) -> tuple[Model, bool, list[str], list[str]]:
        try:
            capabilities = read_capabilities(staged.path, fmt)
            old = self._conflicts(
                model_name, filename, digest=staged.digest, fmt=fmt, source_uri=source_uri, refuse=not replace
            )
            incoming = 0 if self.cache.has(staged.digest) else staged.size
            evicted = self._make_room(incoming, keep=model_name, context=context)
            with self.cache.placing():
                self.cache.place(staged)
                artifact = NewArtifact(
                    filename=filename,
                    format=fmt,
                    digest=staged.digest,
                    size_bytes=staged.size,
                    source_uri=source_uri,
                    link_stat=staged.link_stat,
                )
                model, added = self.store.add_artifact(
                    model_name,
                    artifact,
                    capabilities=capabilities,
                    actor=context.actor,
                    replacing=[replaced.filename for replaced in old],
                    # checked again in the write: a concurrent import may have added one meanwhile
                    sole_format=fmt in ONE_PER_MODEL and "#" not in source_uri,
                )
        finally:
            staged.close()
        replaced = [artifact.digest for artifact in old]
        if replaced:
            self._drop_orphans(replaced)
        return model, added, evicted, replaced

    def _drop_orphans(self, digests: list[str]) -> None:
        """Delete the blobs of ``digests`` that no model uses any more."""
        with self.cache.deleting():
            self.store.forget_blobs(digests)
            for digest in digests:
                if self.store.get_blob(digest) is None:
                    self.cache.remove(digest)

    def check_conflict(self, name: ModelName, filename: str, digest: str) -> None:
        """Raise ModelExists when ``name`` already holds ``filename``, or (for a ``.gguf``)
        another GGUF, with other content."""
        fmt = "gguf" if filename.lower().endswith(".gguf") else None
        self._conflicts(name, filename, digest=digest, fmt=fmt, source_uri=None)

    def check_budget(self, incoming: int, *, keep: ModelName) -> None:
        """Refuse up front, changing nothing, content that cannot fit even after evicting."""
        self._check_budget(incoming, keep=keep)

    def _conflicts(
        self,
        name: ModelName,
        filename: str,
        *,
        digest: str,
        fmt: str | None,
        source_uri: str | None,
        refuse: bool = True,
    ) -> list[Artifact]:
        """The model's files that content ``digest`` would take the place of: the file of the
        same name and, for a GGUF, the model's GGUF (the engine loads one; nobody could choose
        which). Raises ModelExists for them when ``refuse``."""
        existing = self.store.get_model(name)
        if existing is None:
            return []
        found: list[Artifact] = []
        for artifact in existing.artifacts:
            if artifact.digest == digest:
                continue
            if artifact.filename == filename:
                found.append(artifact)
                if refuse:
                    raise ModelExists(
                        f"model {name} already has a file {filename!r} with digest {artifact.digest}",
                        hint=_REPLACE_HINT,
                    )
            elif fmt in ONE_PER_MODEL and artifact.format == fmt and not _same_pull(artifact, source_uri):
                if any(other.digest == digest for other in existing.artifacts):
                    continue  # this content is already one of the model's files (a repo pulled again)
                found.append(artifact)
                if refuse:
                    raise ModelExists(
                        f"model {name} already has a {fmt} file, {artifact.filename!r} ({artifact.digest});"
                        f" a model holds one {fmt} file",
                        hint=_REPLACE_HINT,
                    )
        return found

    def _evictable(self, keep: ModelName | None) -> list[Model]:
        """Unpinned models other than ``keep``, least recently used first."""
        candidates = [model for model in self.store.list_models() if not model.pinned and model.name != keep]
        return sorted(candidates, key=lambda model: model.last_used_at)

    def _shared(self) -> bool:
        """Whether other servers share the registry: then each keeps its own cache, and eviction here
        drops only this cache's copies (the others may still serve the model, and fetch it back)."""
        return self.blob_source is not None and self.blob_source.shared()

    def _held_bytes(self) -> int:
        """What the budget counts: every registered blob, or on a shared registry those in this cache."""
        if not self._shared():
            return self.store.cache_bytes()
        on_disk = self.cache.blob_files()
        return sum(blob.size_bytes for blob in self.store.list_blobs() if blob.digest in on_disk)

    def _kept_digests(self, keep: ModelName | None) -> set[str]:
        return {
            artifact.digest
            for model in self.store.list_models()
            if model.pinned or model.name == keep
            for artifact in model.artifacts
        }

    def _check_budget(self, incoming: int, *, keep: ModelName) -> None:
        """Refuse up front, changing nothing, an import that cannot fit even after evicting."""
        limit = self.max_bytes()
        if limit is None:
            return
        kept = self._kept_digests(keep)
        if self._shared():
            kept &= set(self.cache.blob_files())
        held = self._held_bytes()
        kept_bytes = sum(blob.size_bytes for blob in self.store.list_blobs() if blob.digest in kept)
        floor = kept_bytes if self.evict_policy() == "lru" else held
        if floor + incoming > limit:
            raise CacheFull(
                f"the model needs {incoming} bytes; the cache holds {held} of"
                f" models.cache.max_bytes={limit}, and only {held - floor} can be evicted"
            )

    def _make_room(self, incoming: int, *, keep: ModelName | None, context: Context) -> list[str]:
        limit = self.max_bytes()
        evicted: list[str] = []
        if limit is None or self.evict_policy() != "lru":
            return evicted
        shared = self._shared()
        for model in self._evictable(keep):
            if self._held_bytes() + incoming <= limit:
                break
            if shared:
                if not self._evict_here(model, self._kept_digests(keep), context):
                    continue  # none of its files are in this cache
            else:
                self._remove(model.name, context, action="models.evict")
            evicted.append(str(model.name))
        return evicted

    def _evict_here(self, model: Model, kept: set[str], context: Context) -> bool:
        """On a shared registry: delete this cache's copies of a model's files (not those a pinned or
        kept model uses), leaving it registered for the other servers; whether any were here."""
        here = [a.digest for a in model.artifacts if a.digest not in kept and self.cache.has(a.digest)]
        if not here:
            return False
        with audited(self.store, context, action="models.evict", target=str(model.name)) as note:
            with self.cache.deleting():
                note.bytes = sum(self.cache.remove(digest) for digest in here)
            note.detail.update(digests=here, here_only=True)
        return True

    # -- removal -----------------------------------------------------------------------------

    def remove(self, name: str, context: Context) -> int:
        """Remove a model; returns the bytes freed (blobs other models share are kept)."""
        return self._remove(ModelName.parse(name), context, action="models.delete")

    def ensure_intact(self, digest: str) -> None:
        """Before the engine maps a blob that shares its inode with a file outside the cache (a
        hard-linked import): when that inode changed since the blob was last verified, re-hash it;
        content that no longer matches is quarantined, never served."""
        blob = self.store.get_blob(digest)
        if blob is None or blob.link_stat is None or blob.link_stat == self.cache.link_stat(digest):
            return
        owners = tuple(
            str(model.name)
            for model in self.store.list_models()
            if any(artifact.digest == digest for artifact in model.artifacts)
        )
        result = self._verify_blob(digest, owners, Context(actor="engine"))
        if not result.ok:
            raise ModelNotLoadable(
                f"the file of {', '.join(owners)} was changed through its hard link: {result.detail}",
                hint="remove the model and import it again (without --link, it is copied)",
            )

    def _remove(self, name: ModelName, context: Context, *, action: str) -> int:
        with audited(self.store, context, action=action, target=str(name)) as note:
            with self.cache.deleting():
                removed = self.store.remove_model(name)
                freed = sum(self.cache.remove(digest) for digest in removed.orphaned_digests)
                self.store.forget_blobs(removed.orphaned_digests)
            note.bytes = freed
            note.detail["digests"] = [artifact.digest for artifact in removed.model.artifacts]
            return freed

    # -- pin ---------------------------------------------------------------------------------

    def set_pinned(self, name: str, pinned: bool, context: Context) -> Model:
        model_name = ModelName.parse(name)
        action = "models.pin" if pinned else "models.unpin"
        with audited(self.store, context, action=action, target=str(model_name)):
            return self.store.set_pinned(model_name, pinned)

    # -- verify ------------------------------------------------------------------------------

    def verify(self, context: Context, *, name: str | None = None) -> list[VerifyResult]:
        """Re-hash blobs (one model's, or all); a mismatch moves the blob to quarantine."""
        models = [self.get(name)] if name else self.store.list_models()
        owners: dict[str, list[str]] = {}
        for model in models:
            for artifact in model.artifacts:
                owners.setdefault(artifact.digest, []).append(str(model.name))
        return [self._verify_blob(digest, tuple(names), context) for digest, names in sorted(owners.items())]

    def _verify_blob(self, digest: str, names: tuple[str, ...], context: Context) -> VerifyResult:
        with audited(self.store, context, action="models.verify", target=digest) as note:
            note.detail["models"] = list(names)
            if not self.cache.has(digest) and self.blob_source is not None and self.blob_source.shared():
                # Another server's cache may hold it (it comes here when a request needs it):
                # quarantining the shared row would take it from every server.
                note.detail["here"] = False
                return VerifyResult(digest, names, ok=True, detail="not in this server's cache; not checked")
            if not self.cache.has(digest):
                detail = "the blob is missing or quarantined"
                self.store.mark_verified(digest, state="quarantined")
            else:
                blob = self.store.get_blob(digest)
                # Taken before hashing, so a write while we hash is noticed next time.
                link_stat = self.cache.link_stat(digest) if blob is not None and blob.link_stat else None
                actual = self.cache.hash_blob(digest)
                note.bytes = self.cache.path(digest).stat().st_size
                if actual == digest:
                    self.store.mark_verified(digest, state="ok", link_stat=link_stat)
                    return VerifyResult(digest, names, ok=True, detail="ok")
                with self.cache.deleting():
                    self.cache.quarantine(digest)
                self.store.mark_verified(digest, state="quarantined")
                detail = f"content hashes to {actual}; moved to quarantine"
            note.outcome = "error"
            note.detail["error"] = detail
            return VerifyResult(digest, names, ok=False, detail=detail)

    # -- garbage -----------------------------------------------------------------------------

    def gc(self, context: Context) -> GcReport:
        """Remove orphan blobs and stale partial files, then evict down to the cache budget."""
        with audited(self.store, context, action="models.gc", target="cache") as note:
            with self.cache.deleting():
                self.store.forget_blobs([blob.digest for blob in self.store.list_blobs()])
                registered = {blob.digest: blob for blob in self.store.list_blobs()}
                on_disk = self.cache.blob_files()
                orphans = [digest for digest in on_disk if digest not in registered]
                freed = sum(self.cache.remove(digest) for digest in orphans)
                for quarantined in self.cache.quarantine_dir.iterdir():
                    if f"sha256:{quarantined.name}" not in registered:
                        info = quarantined.stat()
                        quarantined.unlink()
                        freed += info.st_size if info.st_nlink == 1 else 0  # a linked source keeps it
                partials, partial_bytes = self.cache.remove_stale_staging()
            # On a registry other servers share, a blob missing here is theirs to hold (fetched when needed).
            missing = tuple(
                digest
                for digest, blob in registered.items()
                if digest not in on_disk and blob.state == "ok" and not self._shared()
            )
            evicted = self._make_room(0, keep=None, context=context)
            report = GcReport(
                orphan_blobs=len(orphans),
                stale_partials=partials,
                freed_bytes=freed + partial_bytes,
                evicted=tuple(evicted),
                missing=missing,
            )
            note.bytes = report.freed_bytes
            note.detail.update(
                orphans=orphans, stale_partials=partials, evicted=evicted, missing=list(missing)
            )
            return report


def _same_pull(artifact: Artifact, source_uri: str | None) -> bool:
    """Whether both files came from one pull of a repo (``ref#file``): a repo may hold several GGUFs."""
    if source_uri is None or artifact.source_uri is None or "#" not in source_uri:
        return False
    return artifact.source_uri.split("#")[0] == source_uri.split("#")[0]


def _read_header(source: Path) -> tuple[bytes, int]:
    fd = open_source(source)
    try:
        return os.read(fd, HEADER_BYTES), os.fstat(fd).st_size
    except OSError as exc:
        raise SourceUnreadable(f"{source} cannot be read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _read_chat_template(path: Path) -> str:
    """The GGUF's ``tokenizer.chat_template``, read from its header."""
    template = read_gguf_header(path).scalar("tokenizer.chat_template")
    return template if isinstance(template, str) else ""
