"""GGUF metadata, read from the file's header: the key-value section and the tensor list.

The registry reads capabilities when a model is imported or pulled. It may import
``appliance.errors`` only, so the registry needs no engine (and the engine no registry) for it.

The reader here walks the header once and keeps only what the registry asks for: arrays (a
tokenizer's 150,000 tokens and merges) are counted and skipped, never decoded, and tensor data is
never read. The llama.cpp project's own ``gguf`` reader decodes every field into numpy views
first: 5.9 s for a header with a 152k-token vocabulary, plus 0.1 s to import numpy, on every import
and pull. The format is llama.cpp's ``docs/gguf.md``; ``tests/models/test_gguf.py`` checks this
reader against the ``gguf`` package on the same files, names included.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import UnsupportedFormat

__all__ = ["GGUF_MAGIC", "GgufHeader", "read_gguf_header", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 (2023, 32-bit lengths) is gone from llama.cpp too

_STRING, _ARRAY = 8, 9
# value type -> struct format of one value (strings and arrays are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

# llama.cpp's ``llama_ftype`` (general.file_type), without its MOSTLY_ prefix
FILE_TYPES = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}  # fmt: skip
# ggml's ``ggml_type`` (a tensor's type)
TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip

_READ_AHEAD = 1 << 20
_MAX_STRING = 64 << 20  # a chat template is kilobytes; a longer string is a damaged length
_MAX_DIMENSIONS = 4  # ggml's GGML_MAX_DIMS: llama.cpp refuses more


@dataclass(frozen=True)
class ArrayField:
    """An array in the header, counted and skipped: its item type and length."""

    item_type: int
    count: int


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type_id: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GgufHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)  # scalars and strings; arrays as ArrayField
    tensors: list[Tensor] = field(default_factory=list)

    def scalar(self, key: str) -> Any:
        """The value of ``key`` when it is a number, a bool or a string; None when missing or an array."""
        value = self.fields.get(key)
        return None if isinstance(value, ArrayField) else value


class _Damaged(Exception):
    pass


class _Cursor:
    """Reads the header front to back through a buffer refilled a MiB at a time."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size
        self.buffer = b""
        self.at = 0  # position in buffer
        self.base = 0  # file offset of buffer[0]
        self.order = "<"

    def _need(self, count: int) -> None:
        if self.at + count <= len(self.buffer):
            return
        if self.base + self.at + count > self.size:
            raise _Damaged(f"it ends inside its header (at byte {self.base + self.at} of {self.size})")
        rest = self.buffer[self.at :]
        self.base += self.at
        self.buffer = rest + self.handle.read(max(count - len(rest), _READ_AHEAD))
        self.at = 0
        if len(self.buffer) < count:
            raise _Damaged("it became shorter while it was read")

    def unpack(self, code: str) -> Any:
        layout = struct.Struct(self.order + code)
        self._need(layout.size)
        (value,) = layout.unpack_from(self.buffer, self.at)
        self.at += layout.size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if length > _MAX_STRING:
            raise _Damaged(f"a string claims {length} bytes")
        self._need(length)
        raw = self.buffer[self.at : self.at + length]
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        length_of = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):  # a vocabulary's 150,000 tokens: kept to the fewest calls per item
            if self.at + 8 > len(self.buffer):
                self._need(8)
            (length,) = length_of(self.buffer, self.at)
            end = self.at + 8 + length
            if end <= len(self.buffer):
                self.at = end
            else:
                self.at += 8
                self.skip(length)

    def skip(self, count: int) -> None:
        if self.base + self.at + count > self.size:
            raise _Damaged("a field claims more bytes than the file holds")
        if self.at + count <= len(self.buffer):
            self.at += count
            return
        self.base += self.at + count
        self.handle.seek(self.base)
        self.buffer, self.at = b"", 0

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type == _STRING:
                self.skip_strings(count)
            elif item_type in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item_type]))
            else:  # arrays of arrays: llama.cpp writes none, and their length cannot be skipped
                raise _Damaged(f"an array holds items of type {item_type}, which this reader cannot skip")
            return ArrayField(item_type, count)
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        raise _Damaged(f"a field has the unknown value type {value_type}")


def read_gguf_header(path: Path) -> GgufHeader:
    """The key-value fields and the tensor list of a GGUF file; raises UnsupportedFormat."""
    try:
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise UnsupportedFormat(
                    f"{path.name} is not a GGUF file (it does not start with the GGUF magic)",
                    hint="pass the .gguf file itself, or --format with the file's real format",
                )
            cursor = _Cursor(handle, handle.seek(0, 2))
            cursor.skip(4)
            version = cursor.unpack("I")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                cursor.order = ">"
                version = struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in SUPPORTED_VERSIONS:
                raise _Damaged(f"it is GGUF version {version}; versions 2 and 3 are read")
            tensor_count, field_count = cursor.unpack("Q"), cursor.unpack("Q")
            header = GgufHeader(version)
            for _ in range(field_count):
                key = cursor.string()
                header.fields[key] = cursor.value(cursor.unpack("I"))
            for _ in range(tensor_count):
                name = cursor.string()
                dimensions = cursor.unpack("I")
                if dimensions > _MAX_DIMENSIONS:
                    raise _Damaged(f"tensor {name} claims {dimensions} dimensions")
                shape = tuple(cursor.unpack("Q") for _ in range(dimensions))
                type_id = cursor.unpack("I")
                cursor.unpack("Q")  # where its data starts: not needed for the metadata
                header.tensors.append(Tensor(name, shape, type_id))
            return header
    except (_Damaged, struct.error, MemoryError) as exc:
        raise UnsupportedFormat(
            f"{path.name} starts like a GGUF file but cannot be read: {exc}",
            hint="the file is damaged or truncated; fetch it again",
        ) from exc


def _quantization(header: GgufHeader) -> str:
    file_type = header.scalar("general.file_type")
    if file_type in FILE_TYPES:
        return FILE_TYPES[file_type]
    # No (known) file type recorded: name it after the tensor type holding the most weights.
    weight: Counter[str] = Counter()
    for tensor in header.tensors:
        weight[TENSOR_TYPES.get(tensor.type_id, f"type {tensor.type_id}")] += tensor.elements
    return weight.most_common(1)[0][0] if weight else "unknown"


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Capabilities of a GGUF file; raises UnsupportedFormat when it is not one."""
    header = read_gguf_header(path)
    architecture = header.scalar("general.architecture") or "unknown"
    tokens = header.fields.get("tokenizer.ggml.tokens")
    metadata: dict[str, Any] = {
        "architecture": architecture,
        "model_name": header.scalar("general.name"),
        "context_length": header.scalar(f"{architecture}.context_length"),
        "embedding_length": header.scalar(f"{architecture}.embedding_length"),
        "block_count": header.scalar(f"{architecture}.block_count"),
        "head_count": header.scalar(f"{architecture}.attention.head_count"),
        "head_count_kv": header.scalar(f"{architecture}.attention.head_count_kv"),
        "vocab_size": tokens.count if isinstance(tokens, ArrayField) else None,
        "parameter_count": sum(tensor.elements for tensor in header.tensors),
        "tensor_count": len(header.tensors),
        "quantization": _quantization(header),
        "chat_template": "tokenizer.chat_template" in header.fields,
        # fill-in-the-middle tokens (llama.cpp's newer keys, then its older ones)
        "fill_in_middle": any(
            key in header.fields
            for key in ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")
        )
        or None,
        "pooling_type": header.scalar(f"{architecture}.pooling_type"),
        "gguf_version": header.version,
    }
    return {key: value for key, value in metadata.items() if value is not None}
