"""Ollama's ``capabilities`` for a model, from its chat template and GGUF metadata."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.engine.features import model_capabilities
from tests.engine.tool_templates import LLAMA3, MISTRAL, QWEN, THINKING
from tests.tiny_model import TINY_CHAT_TEMPLATE

LLAMA: dict[str, Any] = {"architecture": "llama"}


@pytest.mark.parametrize(
    ("template", "metadata", "capabilities"),
    [
        ("", LLAMA, ["completion"]),
        (TINY_CHAT_TEMPLATE, LLAMA, ["completion"]),
        (QWEN, LLAMA, ["completion", "tools"]),
        (LLAMA3, LLAMA, ["completion", "tools"]),
        (MISTRAL, LLAMA, ["completion", "tools"]),
        (THINKING, LLAMA, ["completion", "tools", "thinking"]),
        ("{% if enable_thinking %}…{% endif %}", LLAMA, ["completion", "thinking"]),
        ("", {**LLAMA, "fill_in_middle": True}, ["completion", "insert"]),
        ("", {"architecture": "qwen3", "pooling_type": 3}, ["completion", "embedding"]),
        ("", {"architecture": "nomic-bert", "pooling_type": 1}, ["embedding"]),
        ("", {"architecture": "bert"}, ["embedding"]),
    ],
)
def test_capabilities(template: str, metadata: dict[str, Any], capabilities: list[str]) -> None:
    assert model_capabilities(template, metadata) == capabilities
