"""What a model can do, as Ollama's ``/api/show`` lists it in ``capabilities``.

Read from the model's chat template and the GGUF metadata the registry stored at import
(``models/gguf.py``): no model is loaded. Pure; may import ``appliance.engine.tools`` and
``appliance.engine.reasoning`` only.
"""

from __future__ import annotations

from typing import Any

from appliance.engine.reasoning import reasoning_markers
from appliance.engine.tools import handles_tools

__all__ = ["model_capabilities"]

# Architectures llama.cpp runs as encoders only: they embed and never generate.
_ENCODERS = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "neo-bert", "t5encoder"}
)


def model_capabilities(template: str, metadata: dict[str, Any]) -> list[str]:
    """``completion`` (or ``embedding`` for an encoder), ``tools`` when the template shows tools,
    ``insert`` when the vocabulary has fill-in-the-middle tokens, ``thinking`` when the template
    has a reasoning block; embedding-capable generators (a pooling type in the GGUF) add ``embedding``."""
    if metadata.get("architecture") in _ENCODERS:
        return ["embedding"]
    capabilities = ["completion"]
    if template and handles_tools(template):
        capabilities.append("tools")
    if metadata.get("fill_in_middle"):
        capabilities.append("insert")
    if template and reasoning_markers(template) is not None:
        capabilities.append("thinking")
    if metadata.get("pooling_type"):
        capabilities.append("embedding")
    return capabilities
