"""Model names, Ollama-style: ``[namespace/]name[:tag]``, ``:latest`` implied, case-insensitive.

The same string is what every API and the CLI take and what ``/v1/models`` lists as the id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import InvalidModelName

__all__ = ["DEFAULT_TAG", "ModelName", "name_from_filename"]

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 200
_COMPONENT = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_TAG = re.compile(r"^[a-z0-9_][a-z0-9._-]{0,127}$")


@dataclass(frozen=True, order=True)
class ModelName:
    name: str
    tag: str = DEFAULT_TAG

    @classmethod
    def parse(cls, text: str) -> ModelName:
        raw = text.strip().lower()
        if not raw:
            raise InvalidModelName("model name is empty")
        if len(raw) > MAX_NAME_LENGTH:
            raise InvalidModelName(f"model name is longer than {MAX_NAME_LENGTH} characters")
        name, sep, tag = raw.rpartition(":")
        if not sep:
            name, tag = raw, DEFAULT_TAG
        components = name.split("/")
        if len(components) > 3 or not all(_COMPONENT.match(part) for part in components):
            raise InvalidModelName(f"invalid model name {text[:80]!r}")
        if any(part.strip(".") == "" for part in components):
            raise InvalidModelName(f"invalid model name {text[:80]!r}")
        if not _TAG.match(tag):
            raise InvalidModelName(f"invalid tag {tag!r} in model name {text[:80]!r}")
        return cls(name=name, tag=tag)

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def name_from_filename(filename: str) -> ModelName:
    """A default name for a file: its cleaned stem (``Llama-3.Q4_K_M.gguf`` → ``llama-3.q4_k_m``)."""
    stem = filename.rsplit("/", 1)[-1]
    if "." in stem:
        stem = stem.rsplit(".", 1)[0]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("._-") or "model"
    return ModelName.parse(cleaned[:MAX_NAME_LENGTH])
