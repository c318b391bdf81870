"""Servers that share a database, and the blobs they fetch from each other.

Each server keeps its own blob cache, and the registry is shared: a model one server registered
may be missing from another's cache. Then, before it is served there:

    serve ─► register (``servers`` row: id kept in <data>/server-id, advertised URL, a fresh
             server credential stored hashed, its own CA) ─► heartbeat every 15 s
    a request needs a model whose blob is not in this cache
      ─► live peers (heard from within 45 s), each asked HEAD /api/v1/blobs/sha256:HEX
      ─► GET from the first that has it (``BlobFetcher``: Range parts, resume, sha256, no redirects;
         Authorization: Bearer apserver_…)  ─► wrong bytes are discarded, the next peer is tried
      ─► else pulled again by the artifact's source ref (the provisioner: policy, approval, its
         own single flight)  ─► else ModelNotPresent
    a pull of a ref another server pulled finds it registered and its blob missing here
      ─► the provisioner asks ``fill_blob``: the same peers, the same fetch, before any download
    The request waits up to ``server.peer_wait`` seconds, then gets 503 (BlobFetching, Retry-After)
    while the fetch goes on; nothing is served until the blob is whole and verified.

Which blobs each server holds is not recorded: a row per placed or removed blob would have to follow
every import, pull, eviction, gc and quarantine, and could drift from the disk; asking a peer costs
a HEAD per live peer on a cache miss, which the transfer dwarfs. One fetch per digest: threads share
a future, processes on this data dir an flock (the cache being filled is this data dir's, so an
advisory lock across servers would only make unrelated caches wait on each other).

Imports: audit, errors, settings, the store, the cache, the registry, the provisioner, the worker's
blob fetcher and the credential helpers.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic import BaseModel

from appliance import __version__
from appliance.audit import AuditNote, Context, audited, record
from appliance.cluster.fetch import BlobFetcher
from appliance.cluster.tokens import hash_secret, is_server_credential, make_server_credential
from appliance.errors import (
    ApplianceError,
    BlobFetching,
    DigestMismatch,
    DiskFull,
    ModelNotPresent,
    StorageFailure,
    Unauthorized,
)
from appliance.models.service import ModelService
from appliance.provision.service import Provisioner
from appliance.settings import Settings, default_advertise_url
from appliance.store.base import Artifact, Model, Server, Store, utcnow
from appliance.store.cache import BlobCache
from appliance.store.locks import FileLocks
from appliance.tls import tls_files

__all__ = ["ALIVE_SECONDS", "HEARTBEAT_SECONDS", "Peers", "ServerOut", "server_id"]

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
ALIVE_SECONDS = 3 * HEARTBEAT_SECONDS  # a server not heard from for this long is not asked
ASK_TIMEOUT = 5.0  # a HEAD to a peer: one that does not answer soon is passed over
SERVER_ID_FILE = "server-id"


class ServerOut(BaseModel):
    """A server sharing the database, as the API and the CLI list it (never its credential)."""

    id: str
    url: str
    version: str
    started_at: str
    last_seen_at: str
    alive: bool
    this: bool  # the server answering


def server_id(data_dir: Path) -> str:
    """This data dir's server id: made once and kept, so a restart replaces its row, not adds one."""
    path = data_dir / SERVER_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageFailure(
            f"cannot read {path}: {exc.strerror or exc}",
            hint="it holds this server's id; remove it to make a new one",
        ) from exc
    made = uuid.uuid4().hex[:16]
    staging = data_dir / f"{SERVER_ID_FILE}.{made}"
    try:
        staging.write_text(f"{made}\n")
        with suppress(FileExistsError):  # two processes at once: the first link wins, both read it
            os.link(staging, path)
        staging.unlink()
        return path.read_text().strip()
    except OSError as exc:
        raise StorageFailure(f"cannot write {path}: {exc.strerror or exc}") from exc


def _alive(server: Server, now: datetime) -> bool:
    seen = datetime.strptime(server.last_seen_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return now - seen <= timedelta(seconds=ALIVE_SECONDS)


class Peers:
    """This server among those sharing the store: its row and heartbeat, the peers' credentials
    its blob route accepts, and the fetch of a blob another one holds (``ModelService.blob_source``)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        cache: BlobCache,
        models: ModelService,
        provisioner: Provisioner,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.models = models
        self.provisioner = provisioner
        self.transport = transport
        self.id = server_id(settings.data_dir)
        self.context = Context(f"server:{self.id}")
        self._credential: str | None = None  # set by start: only a serving server fetches
        self._row: Server | None = None
        self._fetches: dict[str, Future[None]] = {}
        self._fetches_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._fetchers: set[BlobFetcher] = set()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        models.blob_source = self  # a command's runtime fetches nothing, but says where blobs may be

    # -- this server's row ---------------------------------------------------------------------

    def start(self) -> None:
        """Register with a fresh credential and heartbeat; from now on blobs this cache lacks are
        fetched from peers (the server calls it when it starts serving)."""
        url = self.settings.server.advertise_url or default_advertise_url(self.settings, tls=False)
        ca = tls_files(self.settings).ca_cert
        self._credential = make_server_credential()
        self._row = Server(
            id=self.id,
            url=url,
            credential_hash=hash_secret(self._credential),
            version=__version__,
            ca_pem=ca.read_text() if url.startswith("https:") and ca.is_file() else None,
        )
        try:
            self.store.register_server(self._row)
        except DiskFull as exc:  # serving goes on; the heartbeat registers it once there is room
            logger.warning("cannot register this server for its peers: %s", exc)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peer-fetch")
        self._heartbeat = threading.Thread(target=self._beat, name="server-heartbeat", daemon=True)
        self._heartbeat.start()
        self.provisioner.fill_blob = self.fill_blob

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                now = utcnow()
                if not self.store.touch_server(self.id, now) and self._row is not None:
                    # never registered (a full disk at start), or forgotten since (a database
                    # restored from before it started)
                    self.store.register_server(replace(self._row, last_seen_at=now))
            except ApplianceError as exc:  # the database is away: peers pass over us until it is back
                logger.warning("server heartbeat failed: %s", exc)

    def close(self) -> None:
        """Stop heartbeating and fetching (a fetch's finished parts stay, to resume)."""
        self._stop.set()
        for fetcher in list(self._fetchers):
            fetcher.cancel.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    # -- who shares the store ------------------------------------------------------------------

    def list_servers(self) -> list[ServerOut]:
        now = datetime.now(UTC)
        return [
            ServerOut(
                id=server.id,
                url=server.url,
                version=server.version,
                started_at=server.started_at,
                last_seen_at=server.last_seen_at,
                alive=_alive(server, now),
                this=server.id == self.id,
            )
            for server in self.store.list_servers()
        ]

    def shared(self) -> bool:
        return any(server.id != self.id for server in self.store.list_servers())

    def authenticate(self, credential: str, context: Context | None = None) -> Server:
        """The server a credential belongs to; Unauthorized (audited when ``context`` is given)."""
        found = self.store.find_server(hash_secret(credential)) if is_server_credential(credential) else None
        if found is None:
            if context is not None:
                note = AuditNote(
                    target=credential[:15], outcome="error", detail={"reason": "unknown server credential"}
                )
                record(self.store, context, action="auth.failed", note=note)
            raise Unauthorized(
                "this route needs a credential of a server sharing this database (Bearer apserver_…)"
                " or of a node",
                hint="a server's credential changes when it restarts; it fetches with its current one",
            )
        return found

    # -- bringing blobs ------------------------------------------------------------------------

    def bring(self, model: Model, artifacts: Sequence[Artifact]) -> None:
        """Fetch the artifacts' blobs (one fetch per digest, whoever asks), waiting up to
        ``server.peer_wait`` seconds; BlobFetching when they are still on their way."""
        futures = [self._fetch(model, artifact) for artifact in artifacts]
        deadline = time.monotonic() + self.settings.server.peer_wait
        try:
            for future in futures:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise BlobFetching(
                f"model {model.name}'s file is being fetched onto this server; it is served once it is"
                " whole and verified"
            ) from None

    def _fetch(self, model: Model, artifact: Artifact) -> Future[None]:
        if self._executor is None or self._credential is None:
            raise ModelNotPresent(
                f"model {model.name}'s file {artifact.filename} is not in the cache under"
                f" {self.settings.data_dir}; only a running server fetches it from its peers"
            )
        with self._fetches_lock:
            running = self._fetches.get(artifact.digest)
            if running is not None:
                return running
            future = self._executor.submit(self._bring_one, model, artifact)
            self._fetches[artifact.digest] = future
        # Once it ended, however, the next request starts afresh (a peer may have come back).
        future.add_done_callback(lambda _: self._forget(artifact.digest, future))
        return future

    def _forget(self, digest: str, future: Future[None]) -> None:
        with self._fetches_lock:
            if self._fetches.get(digest) is future:
                del self._fetches[digest]

    def fill_blob(self, artifact: Artifact) -> bool:
        """Put a blob a live peer holds into this cache, verified: what the provisioner asks before
        it downloads a ref another server pulled. False when no peer has it (then it downloads)."""
        return self._credential is not None and self._from_peers(artifact, artifact.digest, [])

    def _bring_one(self, model: Model, artifact: Artifact) -> None:
        with FileLocks(self.cache.downloads_dir).hold(f"peer-blob:{artifact.digest}", blocking=True):
            if self.cache.has(artifact.digest):  # another process on this data dir brought it meanwhile
                return
            tried: list[str] = []
            if not self._from_peers(artifact, str(model.name), tried):
                self._pull_again(model, artifact, tried)

    def _from_peers(self, artifact: Artifact, target: str, tried: list[str]) -> bool:
        """Fetch the blob from the first live peer that holds it and sends the right bytes; what
        each one said otherwise goes into ``tried``."""
        for peer in self._holders(artifact.digest, tried):
            try:
                self._fetch_from(peer, artifact, target)
                return True
            except DiskFull:
                raise
            except (ApplianceError, httpx.HTTPError, OSError) as exc:  # the next peer may do
                tried.append(f"{peer.url}: {exc}")
        return False

    def _holders(self, digest: str, tried: list[str]) -> list[Server]:
        """The live peers that answer HEAD for the blob, most recently heard from first."""
        now = datetime.now(UTC)
        peers = sorted(
            (s for s in self.store.list_servers() if s.id != self.id and _alive(s, now)),
            key=lambda s: s.last_seen_at,
            reverse=True,
        )
        holders = []
        for peer in peers:
            try:
                with self._client(peer, timeout=ASK_TIMEOUT) as client:
                    answer = client.head(f"{peer.url.rstrip('/')}/api/v1/blobs/{digest}")
            except httpx.HTTPError as exc:
                tried.append(f"{peer.url}: unreachable ({exc})")
                continue
            if answer.status_code == 200:
                holders.append(peer)
            else:
                tried.append(f"{peer.url}: {answer.status_code}")
        return holders

    def _client(self, peer: Server, *, timeout: float) -> httpx.Client:
        assert self._credential is not None, "start() set it"
        return httpx.Client(
            timeout=timeout,
            verify=self._verify(peer),
            transport=self.transport,
            trust_env=False,
            headers={"Authorization": f"Bearer {self._credential}"},
        )

    @staticmethod
    def _verify(peer: Server) -> ssl.SSLContext | bool:
        """The system's CAs, and the peer's own (``tls init``) when it has one."""
        if not peer.url.startswith("https:") or peer.ca_pem is None:
            return True
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=peer.ca_pem)
        return context

    def _fetch_from(self, peer: Server, artifact: Artifact, target: str) -> None:
        assert self._credential is not None, "start() set it"
        fetcher = BlobFetcher(
            peer.url,
            self._credential,
            self.cache,
            self.settings.models.download,
            verify=self._verify(peer),
            transport=self.transport,
        )
        self._fetchers.add(fetcher)
        try:
            with audited(self.store, self.context, action="models.fetch", target=target) as note:
                note.detail.update(digest=artifact.digest, peer=peer.id, url=peer.url)
                note.bytes = artifact.size_bytes
                fetcher.fetch(artifact.digest)  # verified before it is placed; wrong bytes are dropped
        except DigestMismatch as exc:
            logger.warning("%s sent wrong bytes for %s: %s", peer.url, artifact.digest, exc)
            raise
        finally:
            self._fetchers.discard(fetcher)

    def _pull_again(self, model: Model, artifact: Artifact, tried: list[str]) -> None:
        """No peer had it: pull it by the ref it came from, under the provisioner's policy."""
        asked = "; ".join(tried) if tried else "no other server is alive"
        source = artifact.source_uri
        if source is None:
            raise ModelNotPresent(
                f"model {model.name} is registered, but its file {artifact.filename} is not on this server,"
                f" no peer holds it ({asked}) and it has no source to pull it from"
            )
        ref, _, member = source.partition("#")  # a file of a repo: the repo is pulled
        try:
            self.provisioner.ensure_present(
                ref, self.context, name=str(model.name), expected_digest=None if member else artifact.digest
            )
        except ApplianceError as exc:
            raise ModelNotPresent(
                f"model {model.name} is registered, but its file {artifact.filename} is not on this server,"
                f" no peer holds it ({asked}) and pulling it again from {ref} failed: {exc}"
            ) from exc
        if not self.cache.has(artifact.digest):
            raise ModelNotPresent(
                f"model {model.name}'s file {artifact.filename} is not on this server, no peer holds it"
                f" ({asked}), and {ref} no longer has that content ({artifact.digest})"
            )
