"""The browser UI: ``/`` is its page, ``/ui/*`` its script and style, read from the package
(``importlib.resources``), so it works air-gapped and inside the single executable."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from litestar import MediaType, Response, get
from litestar.static_files import create_static_files_router

__all__ = ["UI_DIR", "ui_assets", "ui_page"]

UI_DIR = Path(str(files("appliance.web") / "ui"))


@get("/", include_in_schema=False, sync_to_thread=False)
def ui_page() -> Response[bytes]:
    """The UI's one HTML page; every view is drawn by /ui/app.js from the JSON API."""
    return Response((UI_DIR / "index.html").read_bytes(), media_type=MediaType.HTML)


ui_assets = create_static_files_router(path="/ui", directories=[UI_DIR], include_in_schema=False)
