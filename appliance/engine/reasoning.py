"""Reasoning blocks: which markers a chat template's model thinks between, and the splitter that
takes that thinking out of the answer as it streams.

A template has a reasoning block when it writes one of the known marker pairs (Qwen 3 and
DeepSeek R1's ``<think>``, ByteDance Seed's, Mistral's ``[THINK]``, Cohere's), or reads the
switch (``enable_thinking``) or the reasoning an earlier turn carries (``reasoning_content``);
those two alone mean ``<think>``. A generation prompt that ends inside an open block (R1's
templates write ``<think>\\n`` for the model) starts the splitter in the reasoning. Pure; may
import ``appliance.engine.base`` only.
"""

from __future__ import annotations

import re

from appliance.engine.base import ReasoningChunk, TextChunk

__all__ = ["ReasoningSplitter", "reasoning_markers", "starts_in_reasoning"]

_MARKERS = (
    ("<think>", "</think>"),
    ("<seed:think>", "</seed:think>"),
    ("[THINK]", "[/THINK]"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
)
_SWITCHES = re.compile(r"\benable_thinking\b|\breasoning_content\b")


def reasoning_markers(template: str) -> tuple[str, str] | None:
    """The (open, close) markers of the template's reasoning block; None when it has none."""
    for markers in _MARKERS:
        if markers[0] in template:
            return markers
    return _MARKERS[0] if _SWITCHES.search(template) else None


def starts_in_reasoning(prompt: str, markers: tuple[str, str]) -> bool:
    """Whether the rendered prompt leaves a reasoning block open for the model to continue."""
    return prompt.rfind(markers[0]) > prompt.rfind(markers[1])


class ReasoningSplitter:
    """Feeds on the answer's text pieces; gives back ReasoningChunks and TextChunks with the
    markers removed. Only a block at the start of the answer (after whitespace) is reasoning, as
    the templates place it; whitespace around the block is dropped. Text that may be the start
    of a marker is held until the next piece decides it."""

    def __init__(self, markers: tuple[str, str], *, inside: bool = False) -> None:
        self.open, self.close = markers
        self._state = "reasoning" if inside else "start"
        self._held = ""
        self._leading = True  # still at the start of the reasoning or of the answer: strip whitespace

    def feed(self, text: str) -> list[ReasoningChunk | TextChunk]:
        self._held += text
        out: list[ReasoningChunk | TextChunk] = []
        while self._held:
            if self._state == "start":
                stripped = self._held.lstrip()
                if stripped.startswith(self.open):
                    self._held, self._state, self._leading = stripped[len(self.open) :], "reasoning", True
                    continue
                if not stripped or self.open.startswith(stripped):
                    break  # may still become the open marker
                self._state = "answer"
                continue
            if self._state == "reasoning":
                index = self._held.find(self.close)
                if index >= 0:
                    self._emit_reasoning(out, self._held[:index].rstrip())
                    self._held, self._state, self._leading = (
                        self._held[index + len(self.close) :],
                        "answer",
                        True,
                    )
                    continue
                keep = _partial_suffix(self._held, self.close)
                ready = self._held[: len(self._held) - keep]
                whole = ready.rstrip()  # trailing whitespace waits: it may sit before the close marker
                self._emit_reasoning(out, whole)
                self._held = self._held[len(whole) :]
                break
            self._emit_answer(out, self._held)
            self._held = ""
        return out

    def finish(self) -> list[ReasoningChunk | TextChunk]:
        """The text still held when the answer ends."""
        held, self._held = self._held, ""
        out: list[ReasoningChunk | TextChunk] = []
        if self._state == "reasoning":
            self._emit_reasoning(out, held.rstrip())
        else:
            self._emit_answer(out, held)
        return out

    def _emit_reasoning(self, out: list[ReasoningChunk | TextChunk], text: str) -> None:
        if self._leading:
            text = text.lstrip()
        if text:
            self._leading = False
            out.append(ReasoningChunk(text))

    def _emit_answer(self, out: list[ReasoningChunk | TextChunk], text: str) -> None:
        if self._leading:
            text = text.lstrip()
        if text:
            self._leading = False
            out.append(TextChunk(text))


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could still become ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
