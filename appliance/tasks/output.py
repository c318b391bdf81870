"""A job's stdout and stderr: kept up to a cap, cut on a UTF-8 boundary, streamed as they come.

Each stream keeps at most ``limit`` bytes. Past the cap the rest is read and dropped (a job that
prints forever must not block on a full pipe), ``truncated`` is set, and the kept bytes end on the
last whole UTF-8 character, so the text never ends in half a character. What is streamed to
``on_output`` is exactly what is kept, decoded as it comes; bytes that are not UTF-8 read as U+FFFD
in both.

Imports: the standard library only.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["OutputCapture", "OutputChunk", "StreamName", "utf8_prefix"]

StreamName = Literal["stdout", "stderr"]

# A UTF-8 character is at most four bytes: a lead byte and up to three continuation bytes.
_MAX_CONTINUATION_BYTES = 3


@dataclass(frozen=True)
class OutputChunk:
    """Text a job printed on one stream, as it came."""

    stream: StreamName
    text: str


def utf8_prefix(data: bytes, limit: int) -> bytes:
    """The longest start of ``data`` of at most ``limit`` bytes that does not end inside a UTF-8
    character. Bytes that are not UTF-8 are cut at ``limit`` (at most three bytes earlier)."""
    if len(data) <= limit:
        return data
    cut = limit
    # data[cut] is the first byte dropped: while it continues a character, drop that character's start too.
    while cut > 0 and limit - cut < _MAX_CONTINUATION_BYTES and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return data[:cut]


class OutputCapture:
    """One stream of one job. ``feed`` and ``close`` are called by the one thread reading it."""

    def __init__(
        self, stream: StreamName, *, limit: int, on_output: Callable[[OutputChunk], None] | None = None
    ) -> None:
        self.stream: StreamName = stream
        self.truncated = False
        self._limit = limit
        self._kept = bytearray()
        self._on_output = on_output
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        """Keep what fits under the cap and stream it; drop the rest."""
        if self.truncated:
            return
        if len(self._kept) + len(data) <= self._limit:
            self._kept += data
            self._emit(self._decoder.decode(data))
            return
        self.truncated = True
        before = len(self._kept)
        # The cut may fall before ``data`` when the kept bytes end in half a character: the decoder
        # holds those bytes back, so they were never streamed either.
        self._kept = bytearray(utf8_prefix(bytes(self._kept) + data, self._limit))
        if len(self._kept) > before:
            self._emit(self._decoder.decode(bytes(self._kept[before:])))

    def close(self) -> None:
        """The stream ended: stream what the decoder held back (half a character reads as U+FFFD)."""
        if not self.truncated:
            self._emit(self._decoder.decode(b"", final=True))

    @property
    def text(self) -> str:
        return self._kept.decode("utf-8", errors="replace")

    @property
    def kept_bytes(self) -> int:
        return len(self._kept)

    def _emit(self, text: str) -> None:
        if text and self._on_output is not None:
            self._on_output(OutputChunk(self.stream, text))
