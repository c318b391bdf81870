"""Cutting a tool's answer to fit ``mcp.max_result_bytes``: the shared cutters tools' ``fit`` use.

An answer is measured as the gateway sends it: its JSON, UTF-8 encoded (``answer_bytes``). A cut
keeps the answer valid (whole list items, text cut on a character boundary) and sets
``truncated``; what still does not fit is the gateway's to refuse, never a broken message.

Imports: pydantic and the tool types only.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from appliance.mcp.types import ToolOutput

__all__ = ["answer_bytes", "cut_text", "fit_list", "fit_text"]

Out = TypeVar("Out", bound=ToolOutput)


def answer_bytes(model: BaseModel) -> int:
    """The size of ``model``'s JSON as the gateway sends it."""
    return len(model.model_dump_json().encode())


def cut_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character; and whether it was cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text, False
    # "ignore" drops the partial character a byte cut can leave at the end, nothing else.
    return encoded[: max(max_bytes, 0)].decode(errors="ignore"), True


def fit_list(output: Out, field: str, limit: int) -> Out:
    """``output`` with as many leading items of its list ``field`` as fit ``limit`` bytes of JSON
    (``truncated`` set when any were dropped); the most that fits is found by bisection."""
    items: list[object] = getattr(output, field)
    if answer_bytes(output) <= limit:
        return output
    low, high = 0, len(items)  # keeping `low` items fits (or low is 0); keeping `high` does not
    while high - low > 1:
        middle = (low + high) // 2
        if answer_bytes(output.model_copy(update={field: items[:middle], "truncated": True})) <= limit:
            low = middle
        else:
            high = middle
    return output.model_copy(update={field: items[:low], "truncated": True})


def fit_text(output: Out, field: str, limit: int) -> Out:
    """``output`` with its text ``field`` cut so the whole answer fits ``limit`` bytes of JSON
    (``truncated`` set when cut). JSON escaping can make text longer than its bytes, so the cut is
    found by bisection over the text's UTF-8 length."""
    text: str = getattr(output, field)
    if answer_bytes(output) <= limit:
        return output
    low, high = 0, len(text.encode())
    while high - low > 1:
        middle = (low + high) // 2
        cut, _ = cut_text(text, middle)
        if answer_bytes(output.model_copy(update={field: cut, "truncated": True})) <= limit:
            low = middle
        else:
            high = middle
    return output.model_copy(update={field: cut_text(text, low)[0], "truncated": True})
