"""GGUF metadata, read with the llama.cpp project's own ``gguf`` reader (pure Python, no llama.cpp).

The registry reads capabilities when a model is imported. It may import ``appliance.errors`` only,
so the registry needs no engine (and the engine no registry) for it.

Only the header is parsed (the reader memory-maps the file; tensor data is never read), so
this is cheap even for large models.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from appliance.errors import UnsupportedFormat

__all__ = ["GGUF_MAGIC", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"


def _scalar(reader: Any, key: str) -> Any:
    import gguf  # with numpy, 0.2 s of every command's start; only reading a header needs it

    field = reader.fields.get(key)
    if field is None or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    return field.contents()


def _quantization(reader: Any) -> str:
    import gguf

    file_type = _scalar(reader, "general.file_type")
    if file_type is not None:
        try:
            return str(gguf.LlamaFileType(file_type).name).removeprefix("MOSTLY_")
        except ValueError:
            pass
    # No file type recorded: name it after the tensor type holding the most bytes.
    weight: Counter[str] = Counter()
    for tensor in reader.tensors:
        weight[tensor.tensor_type.name] += int(tensor.n_bytes)
    return weight.most_common(1)[0][0] if weight else "unknown"


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Capabilities of a GGUF file; raises UnsupportedFormat when it is not one."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UnsupportedFormat(
            f"{path.name} is not a GGUF file (it does not start with the GGUF magic)",
            hint="pass the .gguf file itself, or --format with the file's real format",
        )
    import gguf

    reader: Any = None
    try:
        reader = gguf.GGUFReader(path)
        architecture = _scalar(reader, "general.architecture") or "unknown"
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        metadata: dict[str, Any] = {
            "architecture": architecture,
            "model_name": _scalar(reader, "general.name"),
            "context_length": _scalar(reader, f"{architecture}.context_length"),
            "embedding_length": _scalar(reader, f"{architecture}.embedding_length"),
            "block_count": _scalar(reader, f"{architecture}.block_count"),
            "head_count": _scalar(reader, f"{architecture}.attention.head_count"),
            "head_count_kv": _scalar(reader, f"{architecture}.attention.head_count_kv"),
            "vocab_size": len(tokens.data) if tokens is not None else None,
            "parameter_count": sum(math.prod(int(dim) for dim in tensor.shape) for tensor in reader.tensors),
            "tensor_count": len(reader.tensors),
            "quantization": _quantization(reader),
            "chat_template": "tokenizer.chat_template" in reader.fields,
            # fill-in-the-middle tokens (llama.cpp's newer keys, then its older ones)
            "fill_in_middle": any(
                key in reader.fields
                for key in ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")
            )
            or None,
            "pooling_type": _scalar(reader, f"{architecture}.pooling_type"),
            "gguf_version": _scalar(reader, "GGUF.version"),
        }
    except UnsupportedFormat:
        raise
    except Exception as exc:  # the reader raises ValueError, IndexError, struct and numpy errors
        raise UnsupportedFormat(
            f"{path.name} starts like a GGUF file but cannot be read: {exc}",
            hint="the file is damaged or truncated; fetch it again",
        ) from exc
    finally:
        reader = None  # drop the memory map before the file is renamed or removed
    return {key: value for key, value in metadata.items() if value is not None}
