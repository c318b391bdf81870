"""Artifact formats: telling them apart from their first bytes, and reading their capabilities."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from appliance.errors import UnsupportedFormat
from appliance.models.gguf import GGUF_MAGIC, read_gguf_metadata

__all__ = ["FORMATS", "ONE_PER_MODEL", "detect_format", "guess_format", "read_capabilities"]

FORMATS = ("gguf", "safetensors")
# Formats the engine loads as one file: a model holds at most one (safetensors come in shards).
ONE_PER_MODEL = ("gguf",)
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def _looks_like_safetensors(header: bytes, size: int) -> bool:
    if len(header) < 9:
        return False
    (length,) = struct.unpack("<Q", header[:8])
    return 2 <= length <= min(_SAFETENSORS_MAX_HEADER, size - 8) and header[8:9] == b"{"


def detect_format(header: bytes, *, size: int, filename: str, requested: str | None) -> str:
    """Check the file's first bytes against the requested format, or guess it when none was given."""
    if requested is not None and requested not in FORMATS:
        raise UnsupportedFormat(f"unknown format {requested!r}; known formats: {', '.join(FORMATS)}")
    is_gguf = header.startswith(GGUF_MAGIC)
    is_safetensors = _looks_like_safetensors(header, size)
    if requested == "gguf" and not is_gguf:
        raise UnsupportedFormat(
            f"{filename} is not a GGUF file (it does not start with the GGUF magic)",
            hint="pass the .gguf file itself, or --format with the file's real format",
        )
    if requested == "safetensors" and not is_safetensors:
        raise UnsupportedFormat(f"{filename} is not a safetensors file (its header is not valid)")
    if requested is not None:
        return requested
    if is_gguf:
        return "gguf"
    if is_safetensors:
        return "safetensors"
    raise UnsupportedFormat(f"cannot tell the format of {filename}: it is neither GGUF nor safetensors")


def guess_format(header: bytes, *, size: int) -> str:
    """A file of a pulled repo: a model format when it is one, else ``file`` (config, tokenizer, ...)."""
    if header.startswith(GGUF_MAGIC):
        return "gguf"
    if _looks_like_safetensors(header, size):
        return "safetensors"
    return "file"


def _safetensors_capabilities(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        tensors = {key: value for key, value in header.items() if key != "__metadata__"}
        parameters = sum(math.prod(tensor["shape"]) for tensor in tensors.values())
        dtypes = sorted({tensor["dtype"] for tensor in tensors.values()})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UnsupportedFormat(
            f"{path.name} has a damaged safetensors header: {exc}", hint="fetch the file again"
        ) from exc
    return {"tensor_count": len(tensors), "parameter_count": parameters, "dtypes": dtypes}


def read_capabilities(path: Path, fmt: str) -> dict[str, Any]:
    """Full metadata of an artifact; raises UnsupportedFormat when the content is not that format."""
    if fmt == "gguf":
        return read_gguf_metadata(path)
    if fmt == "file":
        return {}
    return _safetensors_capabilities(path)
