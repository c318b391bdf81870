"""``/api/v1/bundle``: download models as a bundle (a tar), upload one to import it.

The download streams from the cache as it is read; the upload streams into the importer through
a pipe (never held whole in memory), which verifies every blob before it registers any model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Annotated, Any

import anyio.to_thread
from litestar import Request, Router, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.params import Parameter
from litestar.response import Stream

from appliance.audit import Context
from appliance.bridge import ThreadCall
from appliance.bundles import BundleService
from appliance.bundles.schemas import BundleImportOut
from appliance.web.dependencies import provide_models

__all__ = ["bundle_router"]

TAR = "application/x-tar"
UPLOAD_CHUNK_BYTES = 1024 * 1024


def provide_bundles(state: State) -> BundleService:
    return BundleService(provide_models(state))


@get("/", sync_to_thread=True, media_type=TAR)
def export_bundle(
    bundles: BundleService,
    context: Context,
    name: Annotated[
        list[str] | None, Parameter(description="a model to export (name[:tag]); repeat it; none: all")
    ] = None,
) -> Stream:
    """Download models as a bundle: a tar of an OCI image layout, streamed from the cache.

    A name that is not here answers 404 before any byte is sent. Import it elsewhere with
    `POST /api/v1/bundle` or `appliance bundle import`; skopeo and oras read it as it is.
    """
    plan = bundles.plan(name or [])
    return Stream(
        bundles.tar_stream(plan, context),
        media_type=TAR,
        headers={
            "Content-Disposition": 'attachment; filename="models.tar"',
            "Content-Length": str(plan.tar_bytes),
        },
    )


@post("/", status_code=200, request_max_body_size=None)
async def import_bundle(
    request: Request[Any, Any, Any], bundles: BundleService, context: Context
) -> BundleImportOut:
    """Upload a bundle (the tar as the request body, `Content-Type: application/x-tar`) and import it.

    Every blob is verified as it arrives; models are registered only when all of it verified
    (nothing otherwise), and blobs already here are skipped. Answers what was imported.
    """
    read_fd, write_fd = os.pipe()

    def work(_: Callable[[None], None], __: threading.Event) -> BundleImportOut:
        with os.fdopen(read_fd, "rb", buffering=UPLOAD_CHUNK_BYTES) as reader:
            return BundleImportOut.of(bundles.import_from(reader, context, label="upload"))

    call: ThreadCall[None, BundleImportOut] = ThreadCall(work)
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= UPLOAD_CHUNK_BYTES:
                if not await anyio.to_thread.run_sync(_send, write_fd, bytes(pending)):
                    break  # the importer stopped reading: its answer says why
                pending.clear()
        else:
            await anyio.to_thread.run_sync(_send, write_fd, bytes(pending))
    finally:
        os.close(write_fd)  # the end of the body: the importer sees the end of its input
    return await call.result()


def _send(fd: int, data: bytes) -> bool:
    """Write all of ``data`` into the pipe; False when its reader has gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        return False
    return True


bundle_router = Router(
    path="/api/v1/bundle",
    route_handlers=[export_bundle, import_bundle],
    dependencies={"bundles": Provide(provide_bundles, sync_to_thread=False)},
    tags=["bundles"],
)
