"""Model lists at any registry size: pages with a cursor, and answers cached until the registry changes.

A page is keyset-paged in list order (name, then tag): its cursor is the last model it holds,
encoded, so a model added or removed between pages moves no other model into or out of the walk.
A cached answer is whatever bytes a surface renders from the summaries (``/v1/models``,
``/api/tags``), kept beside the registry generation they were read at; any write to the models,
from this process or another (the CLI), changes the generation and the next request renders anew.

Imports the store protocol, model names and the error tree only.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.errors import InvalidInput, InvalidModelName
from appliance.names import ModelName
from appliance.store.base import Model, ModelSummary, Store

__all__ = ["MAX_PAGE", "ListCache", "ModelPage", "decode_cursor", "encode_cursor", "read_page"]

MAX_PAGE = 1000
_CURSOR_HINT = "pass the next cursor a model list gave, unchanged, or leave cursor out to start over"


Listed = TypeVar("Listed", Model, ModelSummary)


@dataclass(frozen=True)
class ModelPage(Generic[Listed]):
    models: list[Listed]
    next_cursor: str | None  # None on the last page


def encode_cursor(name: ModelName) -> str:
    return base64.urlsafe_b64encode(str(name).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> ModelName:
    """The model a cursor points past; InvalidInput for one no list gave."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return ModelName.parse(text)
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidModelName) as exc:
        raise InvalidInput(f"cursor {cursor[:80]!r} is not one a model list gave", hint=_CURSOR_HINT) from exc


def page_limit(limit: int | None) -> int | None:
    """``limit`` checked: None (every model) or 1 to MAX_PAGE; InvalidInput otherwise."""
    if limit is not None and not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(
            f"limit {limit} is out of range",
            hint=f"ask for 1 to {MAX_PAGE} models, and page on with the cursor",
        )
    return limit


def read_page(
    read: Callable[[ModelName | None, int | None], list[Listed]], *, limit: int | None, cursor: str | None
) -> ModelPage[Listed]:
    """A page of what ``read(after, limit)`` lists."""
    after = decode_cursor(cursor) if cursor is not None else None
    checked = page_limit(limit)
    # One more than asked says whether another page follows.
    found = read(after, None if checked is None else checked + 1)
    if checked is None or len(found) <= checked:
        return ModelPage(found, None)
    return ModelPage(found[:checked], encode_cursor(found[checked - 1].name))


class ListCache:
    """Rendered model lists by name, each valid while the registry generation stays the one it was read at."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._answers: dict[str, tuple[int, str, bytes]] = {}
        # Guards _answers and makes concurrent requests after a change render once, not once each.
        self._lock = threading.Lock()

    def answer(
        self, key: str, render: Callable[[list[ModelSummary]], bytes], *, gguf_only: bool, variant: str = ""
    ) -> bytes:
        """``render`` of the summaries, rendered again once the registry or ``variant`` (what else the
        answer holds, e.g. the external providers' models) is not what it was."""
        with self._lock:
            # Read before the models: a write between the two leaves the answer newer than its
            # generation says, so the next request renders again, never an older one kept.
            generation = self._store.registry_generation()
            cached = self._answers.get(key)
            if cached is not None and cached[:2] == (generation, variant):
                return cached[2]
            body = render(self._store.list_model_summaries(gguf_only=gguf_only))
            self._answers[key] = (generation, variant, body)
            return body
