"""``POST /api/v1/models/import-dir``: the models of an Ollama dir or a Hugging Face cache, in place."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from litestar import Request, post
from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.errors import Forbidden
from appliance.models.importdir import DirImporter, DirImportOut
from appliance.models.service import ModelService

__all__ = ["import_dir"]


class ImportDirIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    path: str = Field(description="an Ollama models dir or a Hugging Face cache on the appliance's machine")
    copy_files: bool = Field(
        default=False, alias="copy", description="always copy; by default blobs are hard-linked or reflinked"
    )
    dry_run: bool = Field(default=False, description="report what would be imported; change nothing")


@post("/api/v1/models/import-dir", status_code=200, sync_to_thread=True, tags=["models"])
def import_dir(
    data: ImportDirIn, request: Request[Any, Any, Any], models: ModelService, context: Context
) -> DirImportOut:
    """Import every model an Ollama models dir or a Hugging Face cache holds, linking their blobs
    and checking every digest; each model's outcome is in the answer (a failed one does not stop
    the others). The path is read on the appliance's machine: only a caller on it may ask."""
    _require_local_caller(request)
    return DirImporter(models).import_dir(
        Path(data.path), context, copy=data.copy_files, dry_run=data.dry_run
    )


def _require_local_caller(request: Request[Any, Any, Any]) -> None:
    host = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise Forbidden(
            f"a directory on the appliance's machine can be imported only by a caller on it, not from {host}",
            hint="run `appliance models import-dir PATH` on the appliance's machine",
        )
