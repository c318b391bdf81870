"""A worker's blob fetch: from the server's cache, and from nowhere else.

    GET {server}/api/v1/blobs/sha256:HEX   (the node credential; Range parts, resumable)
      ─► <data>/tmp/downloads/<hex>.partial   (the transfer engine, as pulls use it)
      ─► sha256 == HEX ? place in blobs/ : discard it all (DigestMismatch)

Whatever a config or a work item names, the URL is built here from the server's address and a
digest, and a redirect is refused rather than followed: a worker never reaches the internet
for a model. Blocking; the agent calls it on a thread. Imports: errors, settings, store.cache,
provision.transfer.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from pathlib import Path

import httpx

from appliance.errors import DigestMismatch, DiskFull, InvalidInput, SourceNotAllowed
from appliance.provision.transfer import RemoteFile, Transfer
from appliance.settings import DownloadSettings
from appliance.store.cache import BlobCache, StagedBlob

__all__ = ["BlobFetcher", "check_digest"]

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise InvalidInput(f"{digest!r} is not a blob digest (sha256: and 64 lowercase hex digits)")
    return digest


def _refuse_redirect(response: httpx.Response) -> None:
    if response.is_redirect:
        raise SourceNotAllowed(
            f"{response.request.url} redirected to {response.headers.get('location')!r}: a worker fetches"
            " blobs from its server's cache only",
            hint="check the server's address in worker.json, and any proxy in between",
        )


class BlobFetcher:
    """Fetches blobs into ``cache`` from ``server`` with the node ``credential``."""

    def __init__(
        self,
        server: str,
        credential: str,
        cache: BlobCache,
        options: DownloadSettings,
        *,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.credential = credential
        self.cache = cache
        self.options = options
        self.verify = verify
        self.transport = transport
        self.cancel = threading.Event()  # set when the worker stops: the partial stays, to resume

    def url(self, digest: str) -> str:
        return f"{self.server}/api/v1/blobs/{check_digest(digest)}"

    def fetch(self, digest: str) -> Path:
        """The blob's path in the cache, fetched first when it is not there."""
        if self.cache.has(check_digest(digest)):
            return self.cache.path(digest)
        remote = RemoteFile(
            url=self.url(digest),
            filename=digest,
            headers={"Authorization": f"Bearer {self.credential}"},
            digest=digest,
            identity=f"node-blob:{digest}",
        )
        path, fd = self.cache.open_download(digest.removeprefix("sha256:"))
        if self.cache.has(digest):  # another process placed it while we waited for its lock
            os.close(fd)
            return self.cache.path(digest)

        def before_body(size: int | None) -> None:
            free = self.cache.free_bytes() + os.fstat(fd).st_blocks * 512
            if size is not None and size > free:
                raise DiskFull(
                    f"blob {digest} needs {size} bytes; {free} are free under {self.cache.data_dir}"
                )

        options = self.options
        with httpx.Client(
            timeout=httpx.Timeout(30.0, read=options.stall_timeout),
            limits=httpx.Limits(max_connections=options.connections + 1),
            verify=self.verify,
            transport=self.transport,
            trust_env=False,  # no proxy or CA from the environment: the pinned server only
            event_hooks={"response": [_refuse_redirect]},
        ) as client:
            transfer = Transfer(
                client,
                remote,
                path,
                options,
                before_body=before_body,
                cancel=self.cancel,
                checked_against=digest,
            )
            try:
                result = transfer.run(fd)
            except BaseException:
                os.close(fd)  # the partial and its state stay, to resume
                raise
        if result.digest != digest:
            os.close(fd)
            transfer.discard()  # wrong bytes: nothing of them is kept
            raise DigestMismatch(
                f"the server sent {result.size} bytes for {digest} that hash to {result.digest};"
                " they were discarded",
                hint="run `appliance models verify` on the server; the next load fetches it again",
            )
        staged = StagedBlob(path, result.digest, result.size, "download", fd)
        try:
            with self.cache.placing():
                return self.cache.place(staged)
        finally:
            staged.close()
            transfer.discard()
