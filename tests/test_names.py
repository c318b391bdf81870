"""Model names are Ollama-style name[:tag], with :latest implied and case folded."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidModelName
from appliance.names import ModelName, name_from_filename


@pytest.mark.parametrize(
    ("text", "name", "tag"),
    [
        ("llama3", "llama3", "latest"),
        ("llama3:8b", "llama3", "8b"),
        ("Llama3.2:3B-Instruct", "llama3.2", "3b-instruct"),
        ("library/llama3:8b", "library/llama3", "8b"),
        ("hf.co/org/model:q4_k_m", "hf.co/org/model", "q4_k_m"),
    ],
)
def test_names_parse_and_normalise(text: str, name: str, tag: str) -> None:
    parsed = ModelName.parse(text)
    assert (parsed.name, parsed.tag) == (name, tag)
    assert ModelName.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    ["", ":", "llama3:", ":8b", "a/b/c/d", "bad name", "../x", "x:tag with space", "a" * 300, "-x", "./."],
)
def test_bad_names_are_rejected(text: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("TinyLlama-1.1B.Q4_K_M.gguf", "tinyllama-1.1b.q4_k_m:latest"),
        ("model.safetensors", "model:latest"),
        ("weird name!!.gguf", "weird-name:latest"),
        ("....gguf", "model:latest"),
    ],
)
def test_default_name_comes_from_the_filename(filename: str, expected: str) -> None:
    assert str(name_from_filename(filename)) == expected
