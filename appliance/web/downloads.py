"""``/api/v1/models/pull`` and ``/api/v1/downloads``: pulls by reference, their progress and approval.

A pull is the provisioner's background ``start`` (its ``ensure_present``, as the CLI and Ollama's
pull use); the request awaits it through the bridge, never by polling.

Imports: the provision service, the bridge and the web helpers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from litestar import Controller, Response, delete, get, post
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from appliance.audit import Context
from appliance.bridge import settled
from appliance.provision.schemas import DownloadOut, PullIn, PullOut
from appliance.provision.service import Provisioner
from appliance.queries import DOWNLOAD_STATES, check_download_states
from appliance.web.errors import ErrorInfo, error_tail, problem_body

__all__ = ["DownloadsController", "pull_model"]

STARTED_WAIT = 10.0  # seconds a pull may take before the API answers 202 with its download
# The events stream lists the rows when the downloads' change counter moves (a write on any server
# sharing the store), looking at the counter every EVENTS_GAP: it is in memory, so an idle stream
# holds no thread and reads nothing. A pull of another process on the same SQLite file moves no
# counter here, so the stream lists anyway every EVENTS_INTERVAL.
EVENTS_GAP = 0.1
EVENTS_INTERVAL = 0.5
INTERRUPTED_CHECK = 2.0  # seconds between the stream's looks for rows whose process is gone


@post("/api/v1/models/pull", tags=["models"], status_code=200)
async def pull_model(data: PullIn, provisioner: Provisioner, context: Context) -> Response[Any]:
    """Make a model present by reference. 200 with the model when it already was (or arrived quickly);
    otherwise 202 with its download, to follow at /api/v1/downloads/{id} or /api/v1/downloads/events."""
    ticket = provisioner.start(
        data.ref, context, name=data.name, expected_digest=data.digest, strict=data.strict
    )
    deadline = time.monotonic() + STARTED_WAIT
    await anyio.to_thread.run_sync(ticket.started.wait, STARTED_WAIT)
    # Local work (an import, a lookup) has no download: give it until the deadline to finish.
    if ticket.download_id is None:
        await settled(ticket.future, timeout=max(0.0, deadline - time.monotonic()))
    if ticket.future.done():
        return Response(PullOut.of(ticket.future.result()).model_dump(mode="json"))
    if ticket.download_id is None:  # still importing, or waiting for a pull of the same ref to end
        return Response({"ref": data.ref, "state": "working", "download": None}, status_code=202)
    download = provisioner.get_download(ticket.download_id)
    return Response(DownloadOut.of(download).model_dump(mode="json"), status_code=202)


class DownloadsController(Controller):
    path = "/api/v1/downloads"
    tags = ["downloads"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/", sync_to_thread=True)
    def list_downloads(
        self,
        provisioner: Provisioner,
        states: Annotated[
            list[str] | None,
            Parameter(
                query="state", schema_extra={"items": {"type": "string", "enum": list(DOWNLOAD_STATES)}}
            ),
        ] = None,
    ) -> list[DownloadOut]:
        """Downloads, newest first; ``?state=pending`` (repeatable) filters."""
        wanted = check_download_states(states or ())
        return [DownloadOut.of(d) for d in provisioner.list_downloads(states=wanted)]

    @get("/events")
    async def download_events(self, provisioner: Provisioner) -> ServerSentEvent:
        """Server-sent events: each download row as JSON whenever it changes (progress, state)."""

        async def changes() -> AsyncIterator[ServerSentEventMessage]:
            seen: dict[str, str] = {}
            while True:
                counter = provisioner.downloads_seen()
                found = await anyio.to_thread.run_sync(
                    lambda: provisioner.list_downloads(limit=50, checked_within=INTERRUPTED_CHECK)
                )
                for download in reversed(found):
                    if seen.get(download.id) != download.updated_at:
                        seen[download.id] = download.updated_at
                        row = json.dumps(DownloadOut.of(download).model_dump(mode="json"))
                        yield ServerSentEventMessage(data=row, event="download")
                listed = time.monotonic()
                await asyncio.sleep(EVENTS_GAP)
                while provisioner.downloads_seen() == counter and time.monotonic() - listed < EVENTS_INTERVAL:
                    await asyncio.sleep(EVENTS_GAP)

        # Each message names its event type itself: Litestar's event_type would also send a stray
        # "event:" line before the first message, which then carries the field twice.
        def error(info: ErrorInfo) -> ServerSentEventMessage:
            return ServerSentEventMessage(data=json.dumps(problem_body(info)), event="error")

        return ServerSentEvent(error_tail(changes(), error, where="GET /api/v1/downloads/events"))

    @get("/{download_id:str}", sync_to_thread=True)
    def show_download(self, download_id: str, provisioner: Provisioner) -> DownloadOut:
        """One download: state, bytes done and total, rate, error."""
        return DownloadOut.of(provisioner.get_download(download_id))

    @post("/{download_id:str}/approve", sync_to_thread=True, status_code=200)
    def approve_download(self, download_id: str, provisioner: Provisioner, context: Context) -> DownloadOut:
        """Let a pending download go ahead."""
        return DownloadOut.of(provisioner.decide(download_id, approve=True, context=context))

    @post("/{download_id:str}/deny", sync_to_thread=True, status_code=200)
    def deny_download(self, download_id: str, provisioner: Provisioner, context: Context) -> DownloadOut:
        """Refuse a pending download; the waiting pull fails with download_denied."""
        return DownloadOut.of(provisioner.decide(download_id, approve=False, context=context))

    @delete("/{download_id:str}", sync_to_thread=True, status_code=200)
    def cancel_download(self, download_id: str, provisioner: Provisioner, context: Context) -> DownloadOut:
        """Cancel a pending or running pull, whichever process or server runs it (it stops within a
        second); its finished parts stay for the next pull of the ref."""
        return DownloadOut.of(provisioner.cancel(download_id, context))
