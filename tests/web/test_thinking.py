"""A model that thinks, through both compatible APIs with the real ``ollama`` and ``openai``
clients against a live server: ``think`` reaches the template's switch, and the reasoning block
comes back apart from the answer (Ollama's ``thinking``, OpenAI's ``reasoning_content``), streamed
or not, with no markup left in the answer.

The tiny model's template opens the block for the model (as DeepSeek R1's does) unless think is
false, so its random text is all reasoning, or all answer (the splitter's cuts are proven on canned
outputs in ``tests/engine/test_reasoning.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.conftest import Server
from tests.engine.tool_templates import THINKING
from tests.tiny_model import TINY_CHAT_TEMPLATE
from tests.tool_definitions import WEATHER
from tests.web.conftest import shared_import

# The generation prompt opens the reasoning block; enable_thinking false writes an empty one instead.
OPENS_THE_BLOCK = TINY_CHAT_TEMPLATE.replace(
    "<|assistant|>{% endif %}",
    "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}",
)
GREEDY = {"temperature": 0, "num_predict": 8}
FORCED = {"temperature": 0, "num_predict": 20}  # room for the forced answer, a token a byte
ASK: list[Any] = [{"role": "user", "content": "hi"}]
# The model must write "</think>hi" as a JSON string.
CLOSES_THE_BLOCK = {"type": "string", "enum": ["</think>hi"]}


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module: its tests only ask, and each reads only its own answers."""
    return shared_server


@pytest.fixture(scope="module")
def thinker(shared_data_dir: Path) -> str:
    shared_import(shared_data_dir, "thinker", OPENS_THE_BLOCK)
    shared_import(shared_data_dir, "plain", TINY_CHAT_TEMPLATE)
    return "thinker"


def test_ollama_chat_answers_with_its_thinking_apart(ollama_client: ollama.Client, thinker: str) -> None:
    thought = ollama_client.chat(model=thinker, messages=ASK, think=True, options=GREEDY)
    assert thought.message.thinking
    assert thought.message.content == ""
    assert thought.eval_count == 8
    default = ollama_client.chat(model=thinker, messages=ASK, options=GREEDY)
    assert default.message.thinking == thought.message.thinking  # the template thinks unless told not to
    plain = ollama_client.chat(model=thinker, messages=ASK, think=False, options=GREEDY)
    assert plain.message.thinking is None
    assert plain.message.content
    assert "think>" not in plain.message.content
    streamed = list(ollama_client.chat(model=thinker, messages=ASK, think=True, options=GREEDY, stream=True))
    assert "".join(part.message.thinking or "" for part in streamed) == thought.message.thinking
    assert "".join(part.message.content or "" for part in streamed) == ""
    assert streamed[-1].done


def test_ollama_generate_answers_with_its_thinking_apart(ollama_client: ollama.Client, thinker: str) -> None:
    thought = ollama_client.generate(model=thinker, prompt="hi", think=True, options=GREEDY)
    assert thought.thinking
    assert thought.response == ""
    plain = ollama_client.generate(model=thinker, prompt="hi", think=False, options=GREEDY)
    assert plain.thinking is None
    assert plain.response
    streamed = list(
        ollama_client.generate(model=thinker, prompt="hi", think=True, options=GREEDY, stream=True)
    )
    assert "".join(part.thinking or "" for part in streamed) == thought.thinking
    assert "".join(part.response for part in streamed) == ""


def test_a_grammar_makes_the_whole_output_the_answer(ollama_client: ollama.Client, thinker: str) -> None:
    """The format constrains every token, so nothing of it is reasoning, though the prompt opened
    the block: the forced "</think>hi" comes back whole, as the answer."""
    forced = ollama_client.generate(model=thinker, prompt="hi", format=CLOSES_THE_BLOCK, options=FORCED)
    assert (forced.thinking, forced.response) == (None, '"</think>hi"')


def test_openai_returns_reasoning_content(openai_client: openai.OpenAI, thinker: str) -> None:
    completion = openai_client.chat.completions.create(
        model=thinker, messages=ASK, temperature=0, max_tokens=8
    )
    message = completion.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning
    assert message.content == ""
    stream = openai_client.chat.completions.create(
        model=thinker, messages=ASK, temperature=0, max_tokens=8, stream=True
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == reasoning
    assert "".join(delta.content or "" for delta in deltas) == ""


def test_think_on_a_model_that_cannot_think_is_refused(
    ollama_client: ollama.Client, server: Server, thinker: str
) -> None:
    for call in (
        lambda: ollama_client.chat(model="plain", messages=ASK, think=True),
        lambda: ollama_client.generate(model="plain", prompt="hi", think=True),
    ):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 400
        assert "think is not supported by this model: its chat template has no reasoning block" in (
            refused.value.error
        )
    raw = server.client.post(
        "/api/generate", json={"model": thinker, "prompt": "hi", "raw": True, "think": True}
    )
    assert raw.status_code == 400
    assert "think works through the model's chat template" in raw.json()["error"]
    assert ollama_client.chat(model="plain", messages=ASK, think=False, options=GREEDY).done  # asks nothing


def test_an_earlier_answers_thinking_is_accepted_back(ollama_client: ollama.Client, thinker: str) -> None:
    history = [*ASK, {"role": "assistant", "content": "hello", "thinking": "greet back"}, *ASK]
    assert ollama_client.chat(model=thinker, messages=history, options=GREEDY).done


def test_a_required_tool_call_after_an_opened_block_is_still_a_call(
    openai_client: openai.OpenAI, shared_data_dir: Path
) -> None:
    """Qwen 3's template opens the block; a required call's grammar makes the answer the call."""
    shared_import(shared_data_dir, "qwen3", THINKING)
    completion = openai_client.chat.completions.create(
        model="qwen3", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert getattr(choice.message, "reasoning_content", None) is None
