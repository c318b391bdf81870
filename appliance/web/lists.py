"""The OpenAPI entry of a model list answered from the cache: the bytes are a JSON object.

Imports Litestar's OpenAPI data structures only.
"""

from __future__ import annotations

from typing import Any

from litestar.openapi.datastructures import ResponseSpec

__all__ = ["CACHED_LIST"]

# Without it the document would call a bytes answer a string.
CACHED_LIST = ResponseSpec(data_container=dict[str, Any], description="Request fulfilled, document follows")
