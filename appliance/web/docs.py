"""The API docs page (Swagger UI) at ``/schema``: its scripts come from this server, never from a
CDN, so it works air-gapped, and none is inline, so it works under the strict CSP (guards.py)."""

from __future__ import annotations

import html
from typing import Any

from litestar import Request
from litestar.openapi.plugins import SwaggerRenderPlugin

__all__ = ["DOCS_ASSETS", "DocsPage"]

DOCS_ASSETS = "/schema/assets"
START_SCRIPT = f"{DOCS_ASSETS}/docs.js"  # ui/docs.js: starts Swagger UI on /schema/openapi.json


class DocsPage(SwaggerRenderPlugin):
    def __init__(self) -> None:
        super().__init__(
            js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
            path="/",
        )

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = html.escape(str(openapi_schema["info"]["title"]))
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} API</title>
  <link rel="icon" type="image/png" href="{DOCS_ASSETS}/favicon-32x32.png">
  <link rel="stylesheet" href="{self.css_url}">
  <script src="{self.js_url}" defer></script>
  <script src="{self.standalone_preset_js_url}" defer></script>
  <script src="{START_SCRIPT}" defer></script>
</head>
<body><div id="swagger-container"></div></body>
</html>
""".encode()
