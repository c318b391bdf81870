"""The reasoning splitter on canned model outputs, and the templates' reasoning switch."""

from __future__ import annotations

import pytest

from appliance.engine.base import ReasoningChunk, TextChunk
from appliance.engine.chat import ChatTemplate
from appliance.engine.reasoning import ReasoningSplitter, reasoning_markers, starts_in_reasoning
from appliance.errors import InvalidInput
from tests.engine.tool_templates import QWEN, THINKING
from tests.tiny_model import TINY_CHAT_TEMPLATE

# Qwen 3's switch: the model opens its own block; enable_thinking false closes an empty one for it.
QWEN3_SWITCH = TINY_CHAT_TEMPLATE.replace(
    "<|assistant|>{% endif %}",
    "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}",
)


def split(
    pieces: list[str], *, markers: tuple[str, str] = ("<think>", "</think>"), inside: bool = False
) -> tuple[str, str]:
    """(reasoning, answer) of an output fed piece by piece; no marker may reach either."""
    splitter = ReasoningSplitter(markers, inside=inside)
    parts = [part for piece in pieces for part in splitter.feed(piece)] + splitter.finish()
    reasoning = "".join(part.text for part in parts if isinstance(part, ReasoningChunk))
    answer = "".join(part.text for part in parts if isinstance(part, TextChunk))
    return reasoning, answer


def every_split(text: str) -> list[list[str]]:
    """The text cut into one-character pieces, into two at every place, and whole."""
    return [list(text), *([text[:cut], text[cut:]] for cut in range(1, len(text))), [text]]


@pytest.mark.parametrize(
    ("output", "reasoning", "answer"),
    [
        ("<think>\nThe user greets.\n</think>\n\nHello!", "The user greets.", "Hello!"),
        ("  <think>a < b</think>yes", "a < b", "yes"),
        ("Hello, no thinking here.", "", "Hello, no thinking here."),
        ("<think>\n\n</think>\n\nShort.", "", "Short."),
        ("<think>cut off before the end", "cut off before the end", ""),
        ("<thi", "", "<thi"),
        ("Later <think>is not reasoning</think>", "", "Later <think>is not reasoning</think>"),
    ],
)
def test_the_block_at_the_start_is_split_out_however_the_output_is_cut(
    output: str, reasoning: str, answer: str
) -> None:
    for pieces in every_split(output):
        assert split(pieces) == (reasoning, answer), pieces


def test_a_prompt_that_opened_the_block_starts_in_the_reasoning() -> None:
    for pieces in every_split("Thinking it over.\n</think>\n\nDone."):
        assert split(pieces, inside=True) == ("Thinking it over.", "Done.")
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n", ("<think>", "</think>"))
    assert not starts_in_reasoning("assistant\n<think>\n\n</think>\n\n", ("<think>", "</think>"))
    assert not starts_in_reasoning("assistant\n", ("<think>", "</think>"))


def test_the_templates_own_markers_are_split_too() -> None:
    markers = reasoning_markers("{{ '[THINK]' }}{{ message.content }}{{ '[/THINK]' }}")
    assert markers == ("[THINK]", "[/THINK]")
    for pieces in every_split("[THINK]plan[/THINK]answer"):
        assert split(pieces, markers=markers) == ("plan", "answer")


@pytest.mark.parametrize(
    ("template", "markers"),
    [
        (THINKING, ("<think>", "</think>")),
        (QWEN3_SWITCH, ("<think>", "</think>")),
        ("{% if enable_thinking %}x{% endif %}", ("<think>", "</think>")),
        ("<seed:think>{{ m }}</seed:think>", ("<seed:think>", "</seed:think>")),
        ("<|START_THINKING|>", ("<|START_THINKING|>", "<|END_THINKING|>")),
        (QWEN, None),
        (TINY_CHAT_TEMPLATE, None),
    ],
)
def test_markers_come_from_the_template(template: str, markers: tuple[str, str] | None) -> None:
    assert reasoning_markers(template) == markers


def test_think_is_the_templates_switch() -> None:
    template = ChatTemplate(QWEN3_SWITCH, bos_token="<s>", eos_token="</s>")
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages).endswith("<|assistant|>")
    assert template.render(messages, think=True).endswith("<|assistant|>")
    assert template.render(messages, think=False).endswith("<|assistant|><think>\n\n</think>\n\n")


def test_think_on_a_template_without_a_reasoning_block_is_refused() -> None:
    template = ChatTemplate(TINY_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInput, match="think is not supported by this model"):
        template.render(messages, think=True)
    assert template.render(messages, think=False) == template.render(messages)  # asks for nothing
