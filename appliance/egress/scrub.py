"""Key scrubbing (REQ-MODELS-0125): no configured provider key leaves the egress in any text.

``Scrubber(keys)`` replaces every key with ``[redacted]`` in a whole text (``text``) or in a JSON
value (``value``: a tool call's arguments). A stream is scrubbed through a ``HeldText`` per
channel (answer, reasoning): each piece is passed on less its longest tail that could begin a
key, which waits for the next piece (or ``flush`` at the end), so a key split across two chunks
is caught too.

Imports: the standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["REDACTED", "HeldText", "Scrubber"]

REDACTED = "[redacted]"


class Scrubber:
    def __init__(self, keys: Iterable[str | None]) -> None:
        # Longest first, so a key that contains another is replaced whole.
        self.keys = sorted({key for key in keys if key}, key=len, reverse=True)

    def text(self, text: str) -> str:
        for key in self.keys:
            if key in text:
                text = text.replace(key, REDACTED)
        return text

    def value(self, value: Any) -> Any:
        """A JSON value with every string (object keys too) scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(name)): self.value(item) for name, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` could be the start of a key."""
        longest = 0
        for key in self.keys:
            for size in range(min(len(key) - 1, len(text)), longest, -1):
                if text.endswith(key[:size]):
                    longest = size
                    break
        return longest


class HeldText:
    """One stream of text through a scrubber: what is safe to pass on now, the rest at ``flush``."""

    def __init__(self, scrubber: Scrubber) -> None:
        self.scrubber = scrubber
        self.pending = ""

    def feed(self, text: str) -> str:
        whole = self.scrubber.text(self.pending + text)
        held = self.scrubber.held_back(whole)
        self.pending = whole[len(whole) - held :] if held else ""
        return whole[: len(whole) - held]

    def flush(self) -> str:
        rest, self.pending = self.scrubber.text(self.pending), ""
        return rest
