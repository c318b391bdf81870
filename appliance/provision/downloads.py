"""The ``downloads`` rows of pulls: which row a pull writes, who runs it, its approval, how it ended.

A pull's single-flight lock (an flock on ``<data>/tmp/downloads/<key>.lock``, or the store's
shared lock where several servers share it) is held by the process that runs it, CLI or server,
from before its row is written until it ends. So a row in
an active state whose lock nobody holds lost its process (killed, or stopped with the server): it
becomes ``interrupted``, and the next pull of its ref resumes it under the same id. A pull that
waited on the lock while another pull of its ref ended reads that row: a cancel or a denial ends
every waiter, and a failure is handed to them rather than run again by each.

A pull that needs approval waits here as ``pending`` until an admin approves or denies its row.
A cancel, an approval and a denial are written to the row by whichever process (or server) is
asked; the process running the pull reads them there. So the row's state only moves on from a
state a pull runs in (``advance``) while no cancel came, and the end of a cancelled pull leaves
what the cancel wrote.
May import: audit, errors, names, refs, store.base, store.locks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from appliance.audit import AuditNote, Context, audited, record
from appliance.errors import (
    ApplianceError,
    DownloadCancelled,
    DownloadDenied,
    DownloadFailed,
    DownloadNotFound,
    DownloadNotPending,
    all_error_classes,
)
from appliance.names import ModelName
from appliance.refs import ModelRef
from appliance.store.base import ACTIVE_DOWNLOAD_STATES, Download, DownloadState, Store
from appliance.store.locks import FileLocks, Locks, lock_name

__all__ = ["DownloadRows", "ProgressWriter", "PullProgress", "flight_key"]

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25  # seconds between progress writes to the downloads row
APPROVAL_POLL = 0.25  # seconds between looks at a pending row, for an admin's decision
# a row in one of these states is resumed by the next pull of its ref; a cancel is final
RESUMABLE_STATES = (*ACTIVE_DOWNLOAD_STATES, "failed", "interrupted")
CLOSED_STATES = ("cancelled", "denied")  # ended for good: the next pull of the ref is a new download
INTERRUPTED_NOTE = "the process that ran it ended before it finished; pull the ref again to resume"


@dataclass(frozen=True)
class PullProgress:
    download_id: str
    state: str
    bytes_done: int
    bytes_total: int | None
    rate_bytes_per_s: int
    note: str | None = None  # something the user should know, e.g. why the download starts over


class ProgressWriter:
    """Turns per-chunk progress into a downloads-row update at most every PROGRESS_INTERVAL."""

    def __init__(
        self, store: Store, download_id: str, listener: Callable[[PullProgress], None] | None
    ) -> None:
        self.store = store
        self.download_id = download_id
        self.listener = listener
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._last_bytes = 0
        self._rate = 0

    def __call__(self, done: int, total: int | None, *, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            elapsed = now - self._last_write
            if not force and elapsed < PROGRESS_INTERVAL:
                return
            if self._last_write and elapsed > 0:
                self._rate = max(0, round((done - self._last_bytes) / elapsed))
            self._last_write, self._last_bytes = now, done
            rate = self._rate
        self.store.update_download(
            self.download_id, bytes_done=done, bytes_total=total, rate_bytes_per_s=rate
        )
        if self.listener is not None:
            self.listener(PullProgress(self.download_id, "running", done, total, rate))

    def note(self, text: str) -> None:
        """Tell the user (the row, the progress listener, the log) something about how it runs."""
        logger.info("download %s: %s", self.download_id, text)
        download = self.store.update_download(self.download_id, note=text)
        if self.listener is not None:
            self.listener(
                PullProgress(self.download_id, "running", download.bytes_done, download.bytes_total, 0, text)
            )


class DownloadRows:
    def __init__(self, store: Store, locks_dir: Path) -> None:
        self.store = store
        # Every server sharing the store must see a pull's lock; one machine's processes share files.
        self.locks: Locks = store.shared_locks() or FileLocks(locks_dir)
        self._checked = 0.0  # when mark_interrupted last ran (monotonic)

    def lock(self, ref: str, *, blocking: bool) -> AbstractContextManager[bool]:
        """The ref's pull lock, held by whichever process runs its pull; yields whether it was taken."""
        return self.locks.hold(ref, blocking=blocking)

    def list_downloads(
        self, *, states: tuple[str, ...] = (), limit: int = 100, checked_within: float = 0.0
    ) -> list[Download]:
        # a pull killed while this process runs (a CLI's, another server's) shows as such; a check
        # tries a lock per active row, so a live view that lists at every change skips most
        if time.monotonic() - self._checked >= checked_within:
            self.mark_interrupted()
        return self.store.list_downloads(states=states, limit=limit)

    def get(self, download_id: str) -> Download:
        found = self.store.get_download(download_id)
        if found is None:
            raise DownloadNotFound(f"download {download_id} not found")
        return found

    def mark_interrupted(self) -> None:
        """Rows some process should be running, whose pull lock nobody holds, lost their process."""
        self._checked = time.monotonic()
        for download in self.store.list_downloads(states=ACTIVE_DOWNLOAD_STATES, limit=1000):
            with self.lock(download.ref, blocking=False) as free:
                if free:
                    with contextlib.suppress(DownloadNotPending):  # it ended meanwhile
                        self.store.update_download(
                            download.id,
                            only_from=ACTIVE_DOWNLOAD_STATES,
                            state="interrupted",
                            rate_bytes_per_s=0,
                            note=INTERRUPTED_NOTE,
                        )
                        logger.info("download %s of %s was interrupted", download.id, download.ref)

    def closed_before(self, ref: ModelRef) -> str | None:
        """The id of the ref's latest row when a cancel or a denial has already closed it: a pull that
        starts after that is a new download, not a waiter on that one."""
        latest = self.store.list_downloads(ref=str(ref), limit=1)
        return latest[0].id if latest and latest[0].state in CLOSED_STATES else None

    def raise_if_ended_while_waiting(
        self, ref: ModelRef, *, since: str, expected: str | None, closed_before: str | None
    ) -> None:
        """Hand a pull that waited (since ``since``) how the pull of its ref it waited on ended. A row
        cancelled before the wait began is not handed on, though the pull it stopped may still have
        written its last progress to it during the wait."""
        latest = self.store.list_downloads(ref=str(ref), limit=1)
        if not latest or latest[0].updated_at < since or latest[0].id == closed_before:
            return
        ended = latest[0]
        if ended.state == "cancelled":
            raise DownloadCancelled(
                f"download {ended.id} of {ended.ref} was cancelled while this pull waited for it"
            )
        if ended.state == "denied":
            raise DownloadDenied(f"download {ended.id} of {ended.ref} was denied by {ended.decided_by}")
        # a mismatch with another caller's --digest says nothing about this pull
        if ended.state == "failed" and (
            ended.error_code != "digest_mismatch" or ended.expected_digest == expected
        ):
            raise _error_of(ended)

    def row_for(
        self, ref: ModelRef, model_name: ModelName | None, expected: str | None, context: Context
    ) -> Download:
        """The row of an unfinished earlier pull of this ref, or a new one. A resumed pull keeps the
        row (its id, its progress and its approval) because it continues the same bytes on disk; a
        cancelled pull's row stays cancelled, and a pull after it is a new download."""
        latest = self.store.list_downloads(ref=str(ref), limit=1)
        name = str(model_name) if model_name is not None else None
        if latest and latest[0].state in RESUMABLE_STATES:
            return self.store.update_download(
                latest[0].id,
                model_name=name or latest[0].model_name,
                expected_digest=expected,
                error=None,
                error_code=None,
                note=None,
            )
        return self.store.create_download(
            Download(
                id=uuid.uuid4().hex[:12],
                ref=str(ref),
                state="queued",
                requested_by=context.actor,
                model_name=name,
                expected_digest=expected,
            )
        )

    # -- approval --------------------------------------------------------------------------------

    def await_approval(
        self,
        download: Download,
        context: Context,
        cancel: threading.Event,
        on_progress: Callable[[PullProgress], None] | None,
        *,
        required: bool,
    ) -> Download:
        """Hold the pull as ``pending`` until an admin decides (polled: the decision may come from
        another process); a denial or a cancel raises. A resumed row keeps its earlier decision."""
        if not required or download.state == "approved" or download.decided_by is not None:
            return download
        if download.state != "pending":
            download = self.store.update_download(download.id, state="pending")
            record(
                self.store,
                context,
                action="downloads.request",
                note=AuditNote(target=download.ref, detail={"download_id": download.id}),
            )
        if on_progress is not None:
            on_progress(PullProgress(download.id, "pending", 0, download.bytes_total, 0))
        logger.info("download %s of %s waits for approval", download.id, download.ref)
        while True:
            current = self.store.get_download(download.id)
            if current is None:
                raise DownloadNotFound(f"download {download.id} disappeared while it waited for approval")
            if current.state == "cancelled":  # by another process or server
                raise DownloadCancelled(f"download {current.id} was cancelled while it waited for approval")
            if current.state == "denied":
                raise DownloadDenied(
                    f"download {current.id} of {current.ref} was denied by {current.decided_by}"
                )
            if current.state != "pending":
                return current
            if cancel.wait(APPROVAL_POLL):
                raise DownloadCancelled(f"download {current.id} was cancelled while it waited for approval")

    def decide(self, download_id: str, *, approve: bool, context: Context) -> Download:
        """Approve or deny a pending download; the waiting pull goes on or fails."""
        action = "downloads.approve" if approve else "downloads.deny"
        with audited(self.store, context, action=action, target=download_id) as note:
            note.detail["ref"] = self.get(download_id).ref
            return self.store.update_download(
                download_id,
                only_from=("pending",),
                state="approved" if approve else "denied",
                decided_by=context.actor,
            )

    def advance(self, download: Download, state: DownloadState) -> Download:
        """Move this process's pull on to ``state``. Its pull lock is held here, so the row can only
        have left the states a pull runs in through a cancel (written by any process or server)."""
        try:
            return self.store.update_download(download.id, only_from=RESUMABLE_STATES, state=state)
        except DownloadNotPending as exc:
            raise DownloadCancelled(f"download {download.id} was cancelled") from exc

    def raise_if_cancelled(self, download_id: str) -> None:
        if self.get(download_id).state == "cancelled":
            raise DownloadCancelled(f"download {download_id} was cancelled")

    # -- how a pull ended ------------------------------------------------------------------------

    def failed(self, download: Download, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, ApplianceError) else "internal_error"
        self.store.update_download(
            download.id, state="failed", error=str(exc), error_code=code, rate_bytes_per_s=0
        )

    def failed_before_download(
        self, ref: ModelRef, name: ModelName | None, expected: str | None, context: Context, exc: Exception
    ) -> None:
        """A pull that failed while it read the source's metadata still leaves a failed row, audited."""
        download = self.row_for(ref, name, expected, context)
        self.failed(download, exc)
        code = exc.code if isinstance(exc, ApplianceError) else "internal_error"
        detail = {"download_id": download.id, "error": code, "message": str(exc)}
        note = AuditNote(target=str(ref), outcome="error", detail=detail)
        record(self.store, context, action="models.pull", note=note)

    def cancel(self, download_id: str, context: Context) -> Download:
        """Mark a pull's row cancelled, whichever process or server runs it: that pull sees it (its
        CancelWatch) and stops; its finished parts stay for the next pull of the ref."""
        try:
            return self.store.update_download(
                download_id,
                only_from=ACTIVE_DOWNLOAD_STATES,
                state="cancelled",
                error=f"cancelled by {context.actor}",
                error_code=DownloadCancelled.code,
                rate_bytes_per_s=0,
            )
        except DownloadNotPending as exc:
            state = self.get(download_id).state
            raise DownloadNotPending(
                f"download {download_id} is {state}; nothing runs to cancel",
                hint="only a pending, approved, queued or running pull can be cancelled",
            ) from exc

    def cancelled(self, download: Download, exc: DownloadCancelled) -> None:
        """A row cancelled by an admin keeps what the admin's cancel wrote."""
        with contextlib.suppress(DownloadNotPending):
            self.store.update_download(
                download.id,
                only_from=RESUMABLE_STATES,
                state="cancelled",
                error=str(exc),
                error_code=exc.code,
                rate_bytes_per_s=0,
            )

    def interrupted(self, download: Download) -> None:
        """Stopped without a cancel (Ctrl-C, the server stopping): the next pull resumes it. A row
        cancelled meanwhile (from another process) stays cancelled."""
        with contextlib.suppress(DownloadNotPending):
            self.store.update_download(
                download.id,
                only_from=RESUMABLE_STATES,
                state="interrupted",
                rate_bytes_per_s=0,
                note=INTERRUPTED_NOTE,
            )


def flight_key(text: str) -> str:
    """A ref's (or a file's) name on disk: its pull lock, its partial."""
    return lock_name(text)


def _error_of(download: Download) -> ApplianceError:
    """The error a failed download ended with, for the pulls that waited on it."""
    kinds = {kind.code: kind for kind in all_error_classes()}
    kind = kinds.get(download.error_code or "", DownloadFailed)
    return kind(f"{download.error} (download {download.id}, which this pull waited for)")
