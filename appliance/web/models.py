"""``/api/v1/models``: the registry over HTTP. Each handler makes one service call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from litestar import Controller, Response, delete, get, patch, post
from litestar.params import Parameter
from pydantic import BaseModel, Field

from appliance.audit import Context
from appliance.engine.router import Router
from appliance.models.listing import MAX_PAGE
from appliance.models.schemas import GcOut, ImportIn, ImportOut, ModelOut, VerifyOut
from appliance.models.service import ModelService

__all__ = ["ModelsController"]


class PinIn(BaseModel):
    pinned: bool


class VerifyIn(BaseModel):
    name: str | None = Field(default=None, min_length=1, description="one model; leave it out for all")


class ModelsController(Controller):
    path = "/api/v1/models"
    tags = ["models"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/", sync_to_thread=True)
    def list_models(
        self,
        models: ModelService,
        limit: Annotated[
            int | None, Parameter(ge=1, le=MAX_PAGE, description=f"at most this many, 1 to {MAX_PAGE}")
        ] = None,
        cursor: Annotated[str | None, Parameter(description="the X-Next-Cursor of the page before")] = None,
    ) -> Response[list[ModelOut]]:
        """Models (name:tag) with their artifacts, sizes and digests, by name: every one, or a page of
        ``limit``. When more follow, the ``X-Next-Cursor`` header (and a ``Link`` rel=next) says
        where the next page starts."""
        page = models.page(limit=limit, cursor=cursor)
        headers = {}
        if page.next_cursor is not None:
            headers["X-Next-Cursor"] = page.next_cursor
            headers["Link"] = f'</api/v1/models?limit={limit}&cursor={page.next_cursor}>; rel="next"'
        return Response([ModelOut.of(model) for model in page.models], headers=headers)

    @post("/import", status_code=200, sync_to_thread=True)
    def import_model(self, data: ImportIn, models: ModelService, context: Context) -> ImportOut:
        """Import a file that is on the appliance's own machine."""
        imported = models.import_file(
            Path(data.path),
            context,
            name=data.name,
            fmt=data.format,
            hard_link=data.link,
            replace=data.replace,
        )
        return ImportOut.of(imported)

    @post("/verify", status_code=200, sync_to_thread=True)
    def verify_models(self, data: VerifyIn, models: ModelService, context: Context) -> list[VerifyOut]:
        """Re-hash one model's blobs (or every blob); a mismatch is quarantined and reported with ok=false."""
        return [VerifyOut.of(result) for result in models.verify(context, name=data.name)]

    @post("/gc", status_code=200, sync_to_thread=True)
    def collect_garbage(self, models: ModelService, context: Context) -> GcOut:
        """Remove orphan blobs and stale partial files; evict down to the cache budget."""
        return GcOut.of(models.gc(context))

    @get("/{name:path}", sync_to_thread=True)
    def show_model(self, name: str, models: ModelService) -> ModelOut:
        """One model by name[:tag]."""
        return ModelOut.of(models.get(name.lstrip("/")))

    @patch("/{name:path}", sync_to_thread=True)
    def pin_model(self, name: str, data: PinIn, models: ModelService, context: Context) -> ModelOut:
        """Pin (never evicted) or unpin a model."""
        return ModelOut.of(models.set_pinned(name.lstrip("/"), data.pinned, context))

    @delete("/{name:path}", status_code=200, sync_to_thread=True)
    def remove_model(self, name: str, router: Router, context: Context) -> dict[str, int]:
        """Remove a model; blobs that other models share stay. A loaded copy leaves ps at once and
        unloads when the requests in flight on it have finished."""
        return {"freed_bytes": router.remove_model(name.lstrip("/"), context)}
