"""The registry's GGUF header reader against the llama.cpp project's own reader (the ``gguf``
package, a test dependency), on the same files."""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from appliance.errors import UnsupportedFormat
from appliance.models.gguf import FILE_TYPES, TENSOR_TYPES, read_gguf_header, read_gguf_metadata
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf


def _reference(path: Path) -> dict[str, Any]:
    """What the ``gguf`` package reads from the same header: the capabilities the registry keeps."""
    reader = gguf.GGUFReader(path)

    def scalar(key: str) -> Any:
        found = reader.fields.get(key)
        if found is None or found.types[0] == gguf.GGUFValueType.ARRAY:
            return None
        return found.contents()

    architecture = scalar("general.architecture")
    weight: Counter[str] = Counter()
    for tensor in reader.tensors:
        weight[tensor.tensor_type.name] += int(tensor.n_elements)
    file_type = scalar("general.file_type")
    quantization = (
        gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        if file_type is not None
        else weight.most_common(1)[0][0]
    )
    values = {
        "architecture": architecture,
        "model_name": scalar("general.name"),
        "context_length": scalar(f"{architecture}.context_length"),
        "embedding_length": scalar(f"{architecture}.embedding_length"),
        "block_count": scalar(f"{architecture}.block_count"),
        "head_count": scalar(f"{architecture}.attention.head_count"),
        "head_count_kv": scalar(f"{architecture}.attention.head_count_kv"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "parameter_count": sum(math.prod(int(dim) for dim in tensor.shape) for tensor in reader.tensors),
        "tensor_count": len(reader.tensors),
        "quantization": quantization,
        "chat_template": "tokenizer.chat_template" in reader.fields,
        "fill_in_middle": "tokenizer.ggml.fim_pre_token_id" in reader.fields or None,
        "gguf_version": scalar("GGUF.version"),
    }
    return {key: value for key, value in values.items() if value is not None}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"chat_template": TINY_CHAT_TEMPLATE, "vocab_size": 5000, "fim": True},
        {"f16": True, "layers": 3, "name": "ünïcode name"},
    ],
    ids=["plain", "template-vocab-fim", "f16"],
)
def test_the_header_reads_as_the_gguf_package_reads_it(tmp_path: Path, options: dict[str, Any]) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", **options)
    assert read_gguf_metadata(path) == _reference(path)
    template = read_gguf_header(path).scalar("tokenizer.chat_template")
    assert template == options.get("chat_template")


def test_the_type_names_are_ggml_and_llama_cpps() -> None:
    assert {item.value: item.name.removeprefix("MOSTLY_") for item in gguf.LlamaFileType} == FILE_TYPES
    assert {item.value: item.name for item in gguf.GGMLQuantizationType} == TENSOR_TYPES


def test_a_big_endian_file_reads_as_its_little_endian_twin(tmp_path: Path) -> None:
    def write(path: Path, endian: gguf.GGUFEndian) -> Path:
        writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
        writer.add_name("twin")
        writer.add_context_length(512)
        writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_tensor("w", np.zeros((2, 3), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    little = read_gguf_metadata(write(tmp_path / "le.gguf", gguf.GGUFEndian.LITTLE))
    big = read_gguf_metadata(write(tmp_path / "be.gguf", gguf.GGUFEndian.BIG))
    assert big == little
    assert little["quantization"] == "Q8_0"
    assert (little["vocab_size"], little["context_length"], little["parameter_count"]) == (3, 512, 6)


def test_a_file_without_the_magic_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"GGU")
    with pytest.raises(UnsupportedFormat, match="is not a GGUF file") as refused:
        read_gguf_metadata(path)
    assert refused.value.hint is not None
    assert "--format" in refused.value.hint


def _damaged(tmp_path: Path, change: str) -> Path:
    path = write_llama_gguf(tmp_path / "m.gguf", chat_template=TINY_CHAT_TEMPLATE)
    data = bytearray(path.read_bytes())
    if change == "truncated":
        del data[2000:]  # inside the tokens array
    elif change == "version 1":
        data[4:8] = struct.pack("<I", 1)
    elif change == "string length":
        # the first key's length (after magic, version and the two counts) claims 2**40 bytes
        data[24:32] = struct.pack("<Q", 1 << 40)
    elif change == "value type":
        key_length = struct.unpack_from("<Q", data, 24)[0]
        data[32 + key_length : 36 + key_length] = struct.pack("<I", 77)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("truncated", "it ends inside its header"),
        ("version 1", "it is GGUF version 1; versions 2 and 3 are read"),
        ("string length", "a string claims 1099511627776 bytes"),
        ("value type", "a field has the unknown value type 77"),
    ],
)
def test_a_damaged_header_is_refused_with_what_is_wrong(tmp_path: Path, change: str, says: str) -> None:
    path = _damaged(tmp_path, change)
    with pytest.raises(UnsupportedFormat, match="starts like a GGUF file but cannot be read") as refused:
        read_gguf_metadata(path)
    assert says in refused.value.message
    assert refused.value.hint == "the file is damaged or truncated; fetch it again"


def test_without_a_file_type_the_tensor_type_holding_most_weights_names_it(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("norm", np.zeros((2, 3), dtype=np.float32))
    writer.add_tensor("weights", np.zeros((4, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = read_gguf_metadata(tmp_path / "m.gguf")
    assert (metadata["quantization"], metadata["parameter_count"], metadata["tensor_count"]) == ("F16", 22, 2)
    assert "vocab_size" not in metadata


def _handmade(path: Path, *, fields: Sequence[bytes] = (), tensors: Sequence[bytes] = ()) -> Path:
    """A GGUF v3 header written byte by byte: what a writer would never produce."""
    path.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(fields)) + b"".join(fields) + b"".join(tensors)
    )
    return path


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    ("fields", "tensors", "says"),
    [
        ([], [_text("w") + struct.pack("<I5QIQ", 5, 1, 1, 1, 1, 1, 0, 0)], "tensor w claims 5 dimensions"),
        (
            [_text("nested") + struct.pack("<IIQ", 9, 9, 1)],
            [],
            "an array holds items of type 9, which this reader cannot skip",
        ),
        (
            [_text("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 1 << 40)],
            [],
            "a field claims more bytes than the file holds",
        ),
    ],
    ids=["five-dimensions", "array-of-arrays", "array-past-the-end"],
)
def test_a_header_no_writer_makes_is_refused_with_what_is_wrong(
    tmp_path: Path, fields: list[bytes], tensors: list[bytes], says: str
) -> None:
    path = _handmade(tmp_path / "m.gguf", fields=fields, tensors=tensors)
    with pytest.raises(UnsupportedFormat, match="starts like a GGUF file but cannot be read") as refused:
        read_gguf_metadata(path)
    assert says in refused.value.message


def test_a_handmade_header_reads_its_fields_and_tensors(tmp_path: Path) -> None:
    path = _handmade(
        tmp_path / "m.gguf",
        fields=[
            _text("general.architecture") + struct.pack("<I", 8) + _text("llama"),
            _text("llama.context_length") + struct.pack("<II", 4, 4096),
            _text("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _text("a") + _text("bc"),
        ],
        tensors=[_text("w") + struct.pack("<I2QIQ", 2, 3, 4, 1, 0)],
    )
    metadata = read_gguf_metadata(path)
    assert (metadata["architecture"], metadata["context_length"], metadata["vocab_size"]) == (
        "llama",
        4096,
        2,
    )
    assert (metadata["parameter_count"], metadata["quantization"]) == (12, "F16")
