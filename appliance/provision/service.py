"""``ensure_present``: make a ModelRef present, verified and registered, exactly once.

    parse ─► already present? (no network at all)
          ─► single-flight (threads: a lock per ref; processes and servers: the ref's pull lock)
          ─► present now? (another pull finished it; a peer server's blob fills this cache)
          ─► policy (offline, allow/deny) ─► approval, when required ─► a download slot
          ─► one download (the transfer engine) ─► verify ─► register

Every pull that needs the network has a ``downloads`` row (progress written at most a few
times a second) and an audit event; approvals and denials are audited too. Pulls that wait on
the same ref share how it ends: a cancel, a denial or a failure is not run again by each waiter.
A row whose process ended before it did (killed, or stopped with the server) is marked
``interrupted`` when a Provisioner opens and when downloads are listed, and a later pull of the
ref resumes it under the same id. A successful pull writes the engine handoff and appends to the
provenance log.

Several servers on one store (PostgreSQL) share the rows, the registry and the locks, but each
keeps its own blob cache. So the single flight is of the *download* of a ref: its pull lock is the
store's shared lock, one download row runs at a time whichever server asked, and a cancel, an
approval or a denial written on any server reaches the pull wherever it runs (flight.py). The
*bytes* land per server: a pull that waited while another server pulled the ref finds the model
registered but its blobs missing here; it asks ``fill_blob`` (a peer server's copy, checked
against the registered digest) and, when no peer has them, downloads them itself, as a download of
its own (a row, the policy, the approval: it uses the network like any pull). The
``models.download.max_parallel`` slots are shared the same way.

Here: the single flight, ``ensure_present``, and a download's fetch and register. Elsewhere in
this package: the rows, their approval and the pull lock (downloads.py), the download slots and
cancels across processes (flight.py), the resolver of each scheme (sources.py), the allow and
deny lists (policy.py), the digest checks (verify.py), the handoff and provenance files
(handoff.py), moving bytes (transfer.py).

May import: audit, errors, names, refs, settings, preferences, models (the registry service and
formats), store.base, store.cache; never the engine or the web layer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from appliance.audit import AuditNote, Context, audited
from appliance.errors import (
    DigestMismatch,
    DigestRequired,
    DiskFull,
    DownloadCancelled,
    ModelNotFound,
    UnsupportedFormat,
)
from appliance.models.formats import detect_format, guess_format
from appliance.models.service import ModelService
from appliance.names import ModelName
from appliance.preferences import (
    ALLOWED_SOURCES,
    DENIED_SOURCES,
    OFFLINE,
    REQUIRE_APPROVAL,
    PreferenceService,
)
from appliance.provision.downloads import DownloadRows, ProgressWriter, PullProgress, flight_key
from appliance.provision.flight import CancelWatch, DownloadSlots
from appliance.provision.handoff import append_provenance, write_handoff
from appliance.provision.plan import Plan
from appliance.provision.policy import SourcePolicy
from appliance.provision.push import Pusher
from appliance.provision.sources import source_for
from appliance.provision.transfer import HEADER_BYTES, RemoteFile, Transfer, TransferResult
from appliance.provision.verify import primary_digest, repo_digest, verify
from appliance.refs import OLLAMA_NAMESPACE, DigestRef, FileRef, ModelRef, OciRef, parse_digest, parse_ref
from appliance.settings import Settings
from appliance.store.base import (
    Artifact,
    Download,
    Model,
    NewArtifact,
    Store,
    utcnow,
)
from appliance.store.cache import BlobCache, StagedBlob

__all__ = ["Provisioner", "PullProgress", "PullTicket", "ResolvedModel"]


@dataclass(frozen=True)
class ResolvedModel:
    """What ``ensure_present`` hands to an engine: a registered model and its verified blob."""

    id: str  # the model's name:tag
    digest: str
    path: Path
    format: str
    size: int
    ref: str
    downloaded: bool  # False when it was already present (no network was used)
    verification: str  # expected | source | unverified | present
    download_id: str | None = None


@dataclass
class PullTicket:
    """A pull running in the background (for the API): its future, and the download it created."""

    future: Future[ResolvedModel]
    cancel: threading.Event
    started: threading.Event  # set at the first progress report, or when the pull ends
    download_id: str | None = None


class Provisioner:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        cache: BlobCache,
        models: ModelService,
        *,
        preferences: PreferenceService,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.models = models
        self.preferences = preferences
        self._transport = transport
        self._flights: dict[str, threading.Lock] = {}
        self._flights_lock = threading.Lock()
        self.runtime_dir = settings.data_dir / "runtime"
        self._background: ThreadPoolExecutor | None = None
        self._cancels: dict[str, threading.Event] = {}  # download id -> its pull's cancel, in this process
        self._pending_cancels: set[threading.Event] = set()  # every background pull's cancel
        self._rows = DownloadRows(store, cache.downloads_dir)
        self._feed = store.change_feed()
        self._slots = DownloadSlots(self._rows.locks, settings.models.download.max_parallel)
        self._watch = CancelWatch(store)
        # Puts a blob that another server sharing the store holds into this server's cache (the
        # peers service sets it); False, or None, and the pull downloads the bytes itself.
        self.fill_blob: Callable[[Artifact], bool] | None = None
        self._closing = False  # a pull stopped by close() is interrupted, not cancelled
        self._rows.mark_interrupted()
        # pushes reach registries under the same policy and with the same client as pulls
        self.pusher = Pusher(settings, models, policy=self.policy, new_client=self._client)

    def close(self) -> None:
        """Stop the background pulls (interrupted: their finished parts stay, to resume) and wait for them."""
        self._closing = True
        for cancel in [*self._cancels.values(), *self._pending_cancels]:
            cancel.set()
        if self._background is not None:
            self._background.shutdown(wait=True, cancel_futures=True)
        self._watch.close()

    # -- settings an admin can override with a preference ----------------------------------------

    def policy(self) -> SourcePolicy:
        return SourcePolicy(
            offline=self.preferences.effective(OFFLINE),
            allowed=tuple(self.preferences.effective(ALLOWED_SOURCES)),
            denied=tuple(self.preferences.effective(DENIED_SOURCES)),
        )

    def approval_required(self) -> bool:
        return self.preferences.effective(REQUIRE_APPROVAL)

    # -- the contract ----------------------------------------------------------------------------

    def parse_ref(self, text: str) -> ModelRef:
        """A ModelRef, where an Ollama name (``llama3.2``, ``user/model:tag``) is an ``oci://`` ref
        on ``models.download.ollama_registry``, pulled like any other."""
        return parse_ref(text, ollama_registry=self.settings.models.download.ollama_registry)

    def ensure_present(
        self,
        ref: str | ModelRef,
        context: Context,
        *,
        name: str | None = None,
        expected_digest: str | None = None,
        strict: bool = False,
        on_progress: Callable[[PullProgress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ResolvedModel:
        parsed = self.parse_ref(ref) if isinstance(ref, str) else ref
        expected = parse_digest(expected_digest) if expected_digest else None
        model_name = ModelName.parse(name) if name else _ollama_local_name(ref, parsed)
        if isinstance(parsed, FileRef):
            return self._import_local(parsed, context, model_name, expected, on_progress)
        if isinstance(parsed, DigestRef):
            return self._from_cache(parsed)
        present = self._present(parsed, expected, model_name, context)
        if present is not None:
            return present
        waiting_since = utcnow()
        closed_before = self._rows.closed_before(parsed)
        with self._single_flight(str(parsed)):
            # Another pull finished it; on another server, so its blobs may be in that one's cache
            # only. A peer's copy uses no network to the source: offline mode allows it.
            present = self._present(parsed, expected, model_name, context, fill=True)
            if present is not None:
                return present
            self.policy().check(parsed)
            self._rows.raise_if_ended_while_waiting(
                parsed, since=waiting_since, expected=expected, closed_before=closed_before
            )
            try:
                plan = self._resolve(parsed)
            except Exception as exc:  # a refused manifest or missing repo is a failed download too
                self._rows.failed_before_download(parsed, model_name, expected, context, exc)
                raise
            if strict and expected is None and not plan.all_have_digests:
                raise DigestRequired(
                    f"--strict needs a digest, and {parsed} does not publish one for every file"
                )
            return self._download(
                parsed,
                plan,
                context,
                model_name or plan.default_name,
                expected,
                on_progress,
                cancel or threading.Event(),
            )

    def _import_local(
        self,
        ref: FileRef,
        context: Context,
        name: ModelName | None,
        expected: str | None,
        on_progress: Callable[[PullProgress], None] | None,
    ) -> ResolvedModel:
        """Import a local file; its progress is reported in state ``importing``, with no download
        (``download_id`` is empty), so every pull reports through the same callback."""
        report: Callable[[int], None] | None = None
        if on_progress is not None:
            progress = on_progress
            try:
                total: int | None = ref.path.stat().st_size
            except OSError:
                total = None  # import_file says why it cannot read it

            def report(done: int) -> None:
                progress(PullProgress("", "importing", done, total, 0))

        result = self.models.import_file(
            ref.path, context, name=str(name) if name else None, expected_digest=expected, on_progress=report
        )
        return self._resolved(result.model, result.digest, str(ref), "expected" if expected else "unverified")

    def _from_cache(self, ref: DigestRef) -> ResolvedModel:
        for model in self.store.list_models():
            for artifact in model.artifacts:
                if artifact.digest == ref.digest and artifact.state == "ok" and self.cache.has(ref.digest):
                    return self._resolved(model, artifact.digest, str(ref), "present")
        raise ModelNotFound(f"no model in the cache has the blob {ref.digest}")

    def _present(
        self,
        ref: ModelRef,
        expected: str | None,
        name: ModelName | None,
        context: Context,
        *,
        fill: bool = False,
    ) -> ResolvedModel | None:
        """The fast path: the ref was pulled before and its blobs are intact. No network: under a new
        name, the blobs already in the cache are registered under it too. With ``fill`` (under the
        ref's pull lock), blobs registered but missing from this cache are asked of ``fill_blob``."""
        found = self._pulled_before(ref)
        if found is None:
            return None
        model, artifact = found
        members = [a for a in model.artifacts if (a.source_uri or "").startswith(f"{ref}#")]
        if any(a.state != "ok" for a in members or [artifact]):
            return None
        missing = [a for a in members or [artifact] if not self.cache.has(a.digest)]
        if missing and not (fill and self._fill(missing)):
            return None
        digest = repo_digest([a.digest for a in members]) if members else artifact.digest
        if expected is not None and digest != expected:
            return None
        if name is not None and model.name != name:
            model = self._register_as(name, ref, model, members or [artifact], context)
        if not members:
            return self._resolved(model, artifact.digest, str(ref), "present")
        primary = primary_digest([(a.digest, a.format) for a in members])
        resolved = self._resolved(model, primary, str(ref), "present")
        size = sum(a.size_bytes for a in members)
        return ResolvedModel(**{**resolved.__dict__, "digest": digest, "size": size})

    def _fill(self, artifacts: list[Artifact]) -> bool:
        """Whether ``fill_blob`` put every one of ``artifacts`` into this server's cache."""
        fill_blob = self.fill_blob
        return fill_blob is not None and all(
            fill_blob(artifact) and self.cache.has(artifact.digest) for artifact in artifacts
        )

    def _pulled_before(self, ref: ModelRef) -> tuple[Model, Artifact] | None:
        """The newest artifact fetched from ``ref``. A pull whose bytes were already registered from
        another source adds no artifact: its finished download row maps the ref to the digest."""
        found = self.store.find_artifact_by_source(str(ref))
        if found is not None:
            return found
        for download in self.store.list_downloads(ref=str(ref), states=("done",), limit=1):
            holders = [
                (model, artifact)
                for model in self.store.list_models()
                for artifact in model.artifacts
                if artifact.digest == download.digest
            ]
            holders.sort(key=lambda pair: str(pair[0].name) != download.model_name)  # its own name first
            return holders[0] if holders else None
        return None

    def _register_as(
        self, name: ModelName, ref: ModelRef, model: Model, artifacts: list[Artifact], context: Context
    ) -> Model:
        """Register blobs already in the cache under another name: a pull of a known ref, no network."""
        with audited(self.store, context, action="models.pull", target=str(ref)) as note:
            note.detail.update(
                name=str(name),
                registered_from=str(model.name),
                digests=[a.digest for a in artifacts],
                network=False,
            )
            for artifact in artifacts:  # a conflict on any file registers none of them
                self.models.check_conflict(name, artifact.filename, artifact.digest)
            with self.cache.placing():  # gc cannot delete the blobs while they gain a reference
                for artifact in artifacts:
                    if not self.cache.has(artifact.digest):
                        raise ModelNotFound(f"the blob {artifact.digest} of {ref} left the cache")
                    registered, _ = self.store.add_artifact(
                        name,
                        NewArtifact(
                            filename=artifact.filename,
                            format=artifact.format,
                            digest=artifact.digest,
                            size_bytes=artifact.size_bytes,
                            source_uri=artifact.source_uri
                            if (artifact.source_uri or "").startswith(f"{ref}#")
                            else str(ref),
                        ),
                        capabilities=model.capabilities,
                        actor=context.actor,
                    )
            return registered

    def _resolved(self, model: Model, digest: str, ref: str, verification: str) -> ResolvedModel:
        artifact = next(a for a in model.artifacts if a.digest == digest)
        return ResolvedModel(
            id=str(model.name),
            digest=digest,
            path=self.cache.path(digest),
            format=artifact.format,
            size=artifact.size_bytes,
            ref=ref,
            downloaded=False,
            verification=verification,
        )

    def _resolve(self, ref: ModelRef) -> Plan:
        """The files a network ref stands for, from its source (sources.py)."""
        return source_for(ref).resolve(ref, self.settings.models.download, self._client)

    # -- single flight ---------------------------------------------------------------------------

    @contextmanager
    def _single_flight(self, ref: str) -> Iterator[None]:
        """One pull per ref at a time: a lock for this process's threads, an flock for other processes."""
        key = flight_key(ref)
        with self._flights_lock:
            lock = self._flights.setdefault(key, threading.Lock())
        with lock, self._rows.lock(ref, blocking=True):
            yield

    # -- downloading -----------------------------------------------------------------------------

    def _download(
        self,
        ref: ModelRef,
        plan: Plan,
        context: Context,
        model_name: ModelName,
        expected: str | None,
        on_progress: Callable[[PullProgress], None] | None,
        cancel: threading.Event,
    ) -> ResolvedModel:
        download = self._rows.row_for(ref, model_name, expected, context)
        with self._watch.watching(download.id, cancel):  # a cancel written by any server stops it
            try:
                download = self._rows.await_approval(
                    download, context, cancel, on_progress, required=self.approval_required()
                )
                download = self._rows.advance(download, "queued")
            except DownloadCancelled as exc:
                self._stopped(download, exc)
                raise
            self._report(on_progress, download)
            progress = ProgressWriter(self.store, download.id, on_progress)
            try:
                # Approved (or no approval needed): now wait for one of the max_parallel slots.
                with self._slots.hold(cancel):
                    download = self._rows.advance(download, "running")
                    self._report(on_progress, download)
                    with audited(self.store, context, action="models.pull", target=str(ref)) as note:
                        note.detail.update(download_id=download.id, name=str(model_name))
                        resolved = self._fetch_and_register(
                            ref, plan, context, model_name, expected, progress, cancel, note
                        )
                    # ended before its slot is given back: the pull that takes the slot next starts after
                    self.store.update_download(
                        download.id,
                        state="done",
                        digest=resolved.digest,
                        bytes_done=resolved.size,
                        bytes_total=resolved.size,
                    )
                    if on_progress is not None:
                        on_progress(PullProgress(download.id, "done", resolved.size, resolved.size, 0))
            except DownloadCancelled as exc:
                self._stopped(download, exc)
                raise
            except Exception as exc:
                self._rows.failed(download, exc)
                raise
            except BaseException:  # Ctrl-C in a CLI pull: the parts on disk stay, to resume
                self._rows.interrupted(download)
                raise
        model = self.models.get(resolved.id)
        write_handoff(self.runtime_dir, resolved, ctx_max=model.capabilities.get("context_length"))
        append_provenance(self.runtime_dir, resolved)
        return ResolvedModel(**{**resolved.__dict__, "download_id": download.id})

    @staticmethod
    def _report(on_progress: Callable[[PullProgress], None] | None, download: Download) -> None:
        if on_progress is not None:
            on_progress(
                PullProgress(download.id, download.state, download.bytes_done, download.bytes_total, 0)
            )

    def _stopped(self, download: Download, exc: DownloadCancelled) -> None:
        """A cancel ends the download; close() (the server stopping) only interrupts it."""
        if self._closing:
            self._rows.interrupted(download)
        else:
            self._rows.cancelled(download, exc)

    def _fetch_and_register(
        self,
        ref: ModelRef,
        plan: Plan,
        context: Context,
        model_name: ModelName,
        expected: str | None,
        progress: ProgressWriter,
        cancel: threading.Event,
        note: AuditNote,
    ) -> ResolvedModel:
        """Fetch every file of the plan, verify each, and only then register them all: a failure
        anywhere registers nothing (finished files stay as partials, to resume)."""
        sizes = [remote.size for remote in plan.files]
        grand_total = sum(size for size in sizes if size is not None) if None not in sizes else None
        if grand_total is not None and len(plan.files) > 1:
            self._check_room(grand_total, model_name, held=0, what=str(ref))
        fetched: list[tuple[RemoteFile, StagedBlob, Transfer]] = []
        resumed = 0
        try:
            base = 0
            single = len(plan.files) == 1
            for remote in plan.files:
                staged, transfer, result = self._fetch(
                    remote,
                    model_name,
                    progress,
                    cancel,
                    base=base,
                    grand_total=grand_total,
                    # what will check the result: enough to resume from a server with no validator
                    checked_against=remote.digest or remote.git_blob or (expected if single else None),
                    single=single,
                )
                fetched.append((remote, staged, transfer))
                resumed += result.resumed_bytes
                base += result.size
            progress(base, base, force=True)
            digests = [staged.digest for _, staged, _ in fetched]
            verification = verify(ref, plan, [(remote, staged) for remote, staged, _ in fetched], expected)
            formats = [self._format(staged, remote, single=single) for remote, staged, _ in fetched]
            # the last look before the model is registered: a cancel written since (by any process
            # or server) is still honoured, however little the CancelWatch had left to see it
            self._rows.raise_if_cancelled(progress.download_id)
        except (DigestMismatch, UnsupportedFormat):
            for _, staged, transfer in fetched:
                staged.close()  # wrong content: nothing of it is kept
                transfer.discard()
            raise
        except BaseException:
            for _, staged, _ in fetched:
                staged.release()  # finished files stay as partials: the next pull only re-hashes them
            raise
        note.bytes = base
        note.detail.update(
            digests=digests, resumed_bytes=resumed, files=len(fetched), verification=verification
        )
        if verification == "unverified":
            note.detail["warning"] = "no digest to verify against; recorded as it arrived"
        evicted: list[str] = []
        model: Model | None = None
        try:
            for remote, staged, _ in fetched:  # a conflict on any file registers none of them
                self.models.check_conflict(model_name, remote.filename, staged.digest)
            for (remote, staged, _), fmt in zip(fetched, formats, strict=True):
                source_uri = str(ref) if len(fetched) == 1 else f"{ref}#{remote.filename}"
                model, _, more = self.models.register_staged(
                    staged,
                    model_name,
                    filename=remote.filename,
                    fmt=fmt,
                    source_uri=source_uri,
                    context=context,
                )
                evicted.extend(more)
        finally:
            for _, staged, transfer in fetched:
                staged.close()
                transfer.discard()
        assert model is not None
        note.detail["evicted"] = evicted
        primary = primary_digest(
            [(staged.digest, fmt) for (_, staged, _), fmt in zip(fetched, formats, strict=True)]
        )
        digest = digests[0] if len(digests) == 1 else repo_digest(digests)
        resolved = self._resolved(model, primary, str(ref), verification)
        return ResolvedModel(**{**resolved.__dict__, "digest": digest, "downloaded": True, "size": base})

    def _fetch(
        self,
        remote: RemoteFile,
        model_name: ModelName,
        progress: ProgressWriter,
        cancel: threading.Event,
        *,
        base: int,
        grand_total: int | None,
        checked_against: str | None,
        single: bool,
    ) -> tuple[StagedBlob, Transfer, TransferResult]:
        path, fd = self.cache.open_download(flight_key(remote.key))

        def before_body(size: int | None) -> None:
            if size is not None:
                # what a resumed partial already occupies (its apparent size is the whole file)
                self._check_room(size, model_name, held=os.fstat(fd).st_blocks * 512, what=remote.filename)

        def on_progress(done: int, total: int | None) -> None:
            progress(
                base + done,
                grand_total if grand_total is not None else (None if total is None else base + total),
            )

        def check_header(header: bytes, size: int) -> None:
            # a pulled model file must be a model: refused from its first bytes, not after all of them
            detect_format(header, size=size, filename=remote.filename, requested=None)

        transfer = Transfer(
            self._client(),
            remote,
            path,
            self.settings.models.download,
            on_progress=on_progress,
            before_body=before_body,
            cancel=cancel,
            checked_against=checked_against,
            check_header=check_header if single else None,
            on_note=progress.note,
        )
        try:
            try:
                result = transfer.run(fd)
            finally:
                transfer.client.close()
        except UnsupportedFormat:
            os.close(fd)
            transfer.discard()  # not a model: nothing of it is kept
            raise
        except BaseException:
            os.close(fd)  # the partial and its state stay, to resume
            raise
        return StagedBlob(path, result.digest, result.size, "download", fd), transfer, result

    def _check_room(self, size: int, model_name: ModelName, *, held: int, what: str) -> None:
        """The cache budget and the free disk space, before any body byte (``held``: a partial's bytes)."""
        self.models.check_budget(size, keep=model_name)
        free = self.cache.free_bytes() + held
        if size > free:
            raise DiskFull(
                f"not enough space under {self.settings.data_dir}: {what} needs {size} bytes, {free} are free"
            )

    @staticmethod
    def _format(staged: StagedBlob, remote: RemoteFile, *, single: bool) -> str:
        with open(staged.path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        if single:  # a pulled model file must be a model
            return detect_format(header, size=staged.size, filename=remote.filename, requested=None)
        return guess_format(header, size=staged.size)

    def _check_redirect(self, response: httpx.Response) -> None:
        """Every redirect a download follows is held to the policy, not just the ref it started from."""
        if response.has_redirect_location:
            target = response.request.url.join(response.headers["location"])
            self.policy().check_redirect(str(response.request.url), str(target))

    def _client(self) -> httpx.Client:
        options = self.settings.models.download
        timeout = httpx.Timeout(30.0, read=options.stall_timeout)
        limits = httpx.Limits(
            max_connections=options.connections + 1, max_keepalive_connections=options.connections
        )
        return httpx.Client(
            timeout=timeout,
            limits=limits,
            transport=self._transport,
            trust_env=False,
            event_hooks={"response": [self._check_redirect]},
        )

    # -- in the background -----------------------------------------------------------------------

    def start(self, ref: str, context: Context, **options: Any) -> PullTicket:
        """Run ``ensure_present`` on a worker thread; the API answers as soon as the ticket starts."""
        with self._flights_lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pull")
            background = self._background
        cancel = threading.Event()
        started = threading.Event()
        ticket = PullTicket(future=Future(), cancel=cancel, started=started)
        self._pending_cancels.add(cancel)  # close() stops it even before it has a download

        def on_progress(update: PullProgress) -> None:
            if not update.download_id:  # a local import's progress: no download to show
                return
            if ticket.download_id is None:
                ticket.download_id = update.download_id
                self._cancels[update.download_id] = cancel
            started.set()

        def run() -> ResolvedModel:
            try:
                return self.ensure_present(ref, context, on_progress=on_progress, cancel=cancel, **options)
            finally:
                if ticket.download_id is not None:
                    self._cancels.pop(ticket.download_id, None)
                self._pending_cancels.discard(cancel)
                started.set()

        ticket.future = background.submit(run)
        return ticket

    def cancel(self, download_id: str, context: Context) -> Download:
        """Stop a pending or running pull, whichever process or server runs it (one of this
        process at once, another within CANCEL_POLL); its finished parts stay, to resume."""
        with audited(self.store, context, action="downloads.cancel", target=download_id):
            download = self._rows.cancel(download_id, context)
            cancel = self._cancels.get(download_id)
            if cancel is not None:
                cancel.set()
            return download

    # -- downloads -------------------------------------------------------------------------------

    def list_downloads(
        self, *, states: tuple[str, ...] = (), limit: int = 100, checked_within: float = 0.0
    ) -> list[Download]:
        """Newest first. Rows whose process is gone are marked interrupted first, unless that was
        checked less than ``checked_within`` seconds ago (a live view lists often)."""
        return self._rows.list_downloads(states=states, limit=limit, checked_within=checked_within)

    def downloads_seen(self) -> int:
        """The downloads' change counter now: it moves at each write to a download row (on
        PostgreSQL, by any server; on SQLite, by this process)."""
        return self._feed.current("downloads")

    def get_download(self, download_id: str) -> Download:
        return self._rows.get(download_id)

    def decide(self, download_id: str, *, approve: bool, context: Context) -> Download:
        """Approve or deny a pending download; the waiting pull goes on or fails."""
        return self._rows.decide(download_id, approve=approve, context=context)


def _ollama_local_name(text: str | ModelRef, ref: ModelRef) -> ModelName | None:
    """The name an Ollama name keeps here, as ``ollama pull`` keeps it: without its registry and
    the ``library/`` namespace (``qwen3:4b``, ``team/tiny:v1``). None for every other ref."""
    if not isinstance(text, str) or not isinstance(ref, OciRef) or text.strip().lower().startswith("oci:"):
        return None
    return ModelName.parse(f"{ref.repository.removeprefix(OLLAMA_NAMESPACE + '/')}:{ref.tag}")
