"""Tool calling in the engine: each template family's rendering, its parser on canned answers,
and constrained calls decoded by real llama.cpp on the tiny model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.engine.base import (
    Finished,
    LoadSpec,
    Prompt,
    Ready,
    SamplingParams,
    TextChunk,
    ToolCall,
    ToolSet,
)
from appliance.engine.chat import ChatTemplate
from appliance.engine.pool import EnginePool
from appliance.engine.tools import ToolCallReader, detect_format, handles_tools, offer_tools
from appliance.errors import InvalidInput
from appliance.settings import EngineSettings
from tests.engine.tool_templates import GEMMA_LIKE, MISTRAL, QWEN, TEMPLATES
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf
from tests.tool_definitions import ASK, TIME, WEATHER

AUTO = ToolSet(tools=(WEATHER, TIME))
CALLED: list[dict[str, Any]] = [
    *ASK,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "21 C and sunny"},
]


def template(source: str) -> ChatTemplate:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_each_family_is_told_from_its_template(family: str) -> None:
    assert detect_format(TEMPLATES[family]) == family
    assert handles_tools(TEMPLATES[family]) == (family != "generic")
    assert template(TEMPLATES[family]).tool_format == family


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral"])
def test_templates_that_know_tools_are_given_them(family: str) -> None:
    prompt = template(TEMPLATES[family]).render(ASK, tools=AUTO)
    assert '"name": "get_weather"' in prompt
    assert '"description": "The weather & temperature in a city"' in prompt
    assert "tool_calls" not in prompt  # no generic preamble on top of the template's own


def test_a_named_tool_choice_offers_that_tool_only() -> None:
    named = ToolSet(tools=(WEATHER, TIME), function="get_time")
    prompt = template(QWEN).render(ASK, tools=named)
    assert "get_time" in prompt
    assert "get_weather" not in prompt


def test_a_template_without_tools_gets_the_generic_preamble() -> None:
    in_user_turn = template(TINY_CHAT_TEMPLATE).render(ASK, tools=AUTO)  # it has no system role
    assert in_user_turn.startswith("<s><|user|>You can call these tools")
    assert '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}' in in_user_turn
    assert in_user_turn.rstrip().endswith("Weather in Paris?\n<|assistant|>")

    with_system = [{"role": "system", "content": "Be brief."}, *ASK]
    chatml = template("").render(with_system, tools=ToolSet(tools=(WEATHER,), parallel=False))
    assert chatml.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools")
    assert "with exactly one call" in chatml
    assert "You can call" not in template(TINY_CHAT_TEMPLATE).render(ASK)  # no tools, no preamble


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_earlier_calls_and_results_render_as_each_template_expects(family: str) -> None:
    prompt = template(TEMPLATES[family]).render(CALLED, tools=AUTO)
    assert "21 C and sunny" in prompt
    assert "Paris" in prompt
    if family == "hermes":
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
        assert "<tool_response>\n21 C and sunny\n</tool_response>" in prompt
    if family == "llama3":
        assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in prompt
        assert "<|start_header_id|>ipython<|end_header_id|>\n\n21 C and sunny" in prompt
    if family == "mistral":  # its template refuses ids that are not 9 characters: ours are mapped
        assert "call_abc" not in prompt
        short = json.loads(prompt.split("[TOOL_CALLS]")[1].split("</s>")[0])[0]["id"]
        assert len(short) == 9
        assert f'"call_id": "{short}"' in prompt
    if family == "generic":
        assert (
            '<|assistant|>{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in prompt
        )
        assert (
            '<|user|>{"tool_response": {"content": "21 C and sunny", "tool_call_id": "call_abc"}}' in prompt
        )


def test_results_in_a_template_that_alternates_roles_are_one_user_turn() -> None:
    two_results = [
        *CALLED[:2],
        CALLED[2],
        {"role": "tool", "tool_call_id": "call_def", "content": "dry"},
    ]
    prompt = template(GEMMA_LIKE).render(two_results, tools=AUTO)  # raises if roles did not alternate
    assert prompt.count("<start_of_turn>user") == 2
    assert '"content": "dry"' in prompt


# -- the parsers, on canned answers ----------------------------------------------------------------


def read(fmt: str, answer: str, tools: ToolSet = AUTO, *, piece: int = 1) -> tuple[list[str], list[ToolCall]]:
    """Feed the answer ``piece`` characters at a time, as a stream would; the text pieces and the calls."""
    reader = ToolCallReader(fmt, tools)
    out: list[str | ToolCall] = []
    for start in range(0, len(answer), piece):
        out += reader.feed(answer[start : start + piece])
    out += reader.finish()
    return [part for part in out if isinstance(part, str)], [
        part for part in out if isinstance(part, ToolCall)
    ]


PARIS = ("get_weather", {"city": "Paris"})
CANNED = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Let me check.\n",
        [PARIS],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
        "",
        [PARIS, ("get_time", {"zone": "UTC"})],
    ),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', "", [PARIS]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    (
        "llama3",
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [PARIS],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]',
        "",
        [PARIS],
    ),
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [PARIS]),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}', "", [PARIS]),
    ("generic", '\n{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}', "", [PARIS]),
    ("generic", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [PARIS]),
]


@pytest.mark.parametrize(("fmt", "answer", "text", "calls"), CANNED)
@pytest.mark.parametrize("piece", [1, 5, 10_000])
def test_each_family_reads_its_calls(
    fmt: str, answer: str, text: str, calls: list[tuple[str, dict[str, Any]]], piece: int
) -> None:
    pieces, found = read(fmt, answer, piece=piece)
    assert "".join(pieces) == text
    assert not any("<tool" in part or "[TOOL" in part or "{" in part for part in pieces)  # no markup leaks
    assert [(call.name, call.arguments) for call in found] == calls
    assert all(call.id.startswith("call_") and len(call.id) == 29 for call in found)
    assert len({call.id for call in found}) == len(found)


@pytest.mark.parametrize("fmt", list(TEMPLATES))
@pytest.mark.parametrize(
    "answer",
    [
        "It is sunny in Paris.",
        'Here is JSON: {"a": 1}',
        "a <tool-less answer> and [brackets]",
    ],
)
def test_plain_answers_stay_text_as_they_stream(fmt: str, answer: str) -> None:
    pieces, found = read(fmt, answer)
    assert "".join(pieces) == answer
    assert found == []
    assert len(pieces) > 1  # streamed, not held to the end


@pytest.mark.parametrize(
    ("fmt", "answer"),
    [
        ("hermes", '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'),
        ("hermes", "<tool_call>\nnot json\n</tool_call>"),
        ("llama3", '{"name": "get_weather", "parameters": "Paris"}'),
        ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}'),
        ("generic", '{"answer": 42}'),
        ("generic", '{"response": "hello"}'),
    ],
)
def test_markup_that_is_not_a_valid_call_is_given_back_as_text(fmt: str, answer: str) -> None:
    pieces, found = read(fmt, answer)
    assert "".join(pieces) == answer
    assert found == []


def test_text_held_as_a_possible_marker_is_released_when_it_is_not_one() -> None:
    reader = ToolCallReader("hermes", AUTO)
    assert reader.feed("Hello <tool") == ["Hello "]
    assert reader.feed("box here") == ["<toolbox here"]
    assert reader.finish() == []


def test_without_parallel_calls_only_the_first_call_is_kept() -> None:
    answer = CANNED[1][1]
    _, found = read("hermes", answer, ToolSet(tools=(WEATHER, TIME), parallel=False))
    assert [call.name for call in found] == ["get_weather"]


# -- what a request offers -----------------------------------------------------------------------


def test_offers() -> None:
    assert offer_tools(None) is None
    assert offer_tools([], "auto") is None
    assert offer_tools([WEATHER], "none") is None  # tool_choice none: the tools are not offered
    auto = offer_tools([WEATHER, TIME], "auto")
    assert auto is not None
    assert (auto.required, auto.function, auto.parallel, auto.constrained) == (False, None, True, False)
    required = offer_tools([WEATHER], "required", False)
    assert required is not None
    assert (required.required, required.parallel, required.constrained) == (True, False, True)
    named = offer_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named is not None
    assert (named.function, named.constrained) == ("get_time", True)
    bare = offer_tools([{"type": "function", "function": {"name": "ping"}}])
    assert bare is not None
    assert bare.tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([], "required", "tool_choice asks for a tool call, but the request offers no tools"),
        ([WEATHER], "sometimes", "tool_choice 'sometimes' is not supported"),
        ([WEATHER], 5, "tool_choice must be"),
        (
            [WEATHER],
            {"type": "function", "function": {"name": "get_time"}},
            "tool_choice names 'get_time', which is not among the tools offered",
        ),
        ([WEATHER], {"type": "function"}, "tool_choice as an object must be"),
        ([{"type": "code_interpreter"}], None, "tools.0 is not supported: only"),
        ([{"type": "function"}], None, "tools.0.function is missing"),
        ([{"type": "function", "function": {"name": "two words"}}], None, "tools.0.function.name must be"),
        ([{"function": {"name": "x", "parameters": []}}], None, "tools.0.function.parameters must be"),
        ([WEATHER, WEATHER], None, "tools name get_weather more than once"),
    ],
)
def test_bad_offers_are_refused_with_what_to_fix(tools: list[Any], choice: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        offer_tools(tools, choice)
    assert str(refused.value).startswith(message)


# -- constrained decoding on real llama.cpp --------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Any:
    pool = EnginePool(EngineSettings(parallel=1))
    yield pool
    pool.close()


def decode(
    pool: EnginePool, path: Path, tools: ToolSet, *, messages: list[dict[str, Any]] = ASK
) -> tuple[Ready, str]:
    spec = LoadSpec(
        key=path.stem, digest=path.stem, path=path, size_bytes=path.stat().st_size, context_length=2048
    )
    prompt = Prompt(messages=messages, max_tokens=400, sampling=SamplingParams(temperature=0), tools=tools)

    async def run() -> list[object]:
        return [event async for event in pool.generate(spec, prompt)]

    events = asyncio.run(run())
    assert isinstance(events[0], Ready)
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.reason == "stop", "the grammar ended the answer before max_tokens"
    return events[0], "".join(event.text for event in events if isinstance(event, TextChunk))


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize(
    "tools",
    [
        ToolSet(tools=(WEATHER, TIME), required=True, parallel=False),
        ToolSet(tools=(WEATHER, TIME), function="get_time"),
    ],
    ids=["required", "named"],
)
def test_a_required_call_is_a_valid_call_even_from_random_weights(
    engine: EnginePool, tmp_path: Path, family: str, tools: ToolSet
) -> None:
    path = write_llama_gguf(tmp_path / f"{family}.gguf", context=2048, chat_template=TEMPLATES[family])
    ready, answer = decode(engine, path, tools)
    assert ready.tool_format == family
    pieces, calls = read(family, answer, tools)
    assert "".join(pieces) == ""
    assert len(calls) == 1
    if tools.function is not None:
        assert calls[0].name == "get_time"
        assert calls[0].arguments["zone"] in ("UTC", "CET")
    else:
        assert calls[0].name in ("get_weather", "get_time")


def test_a_mistral_conversation_with_our_ids_renders_on_the_engine(
    engine: EnginePool, tmp_path: Path
) -> None:
    path = write_llama_gguf(tmp_path / "mistral.gguf", context=2048, chat_template=MISTRAL)
    ready, _ = decode(
        engine, path, ToolSet(tools=(WEATHER,), required=True, parallel=False), messages=[*CALLED, *ASK]
    )
    assert ready.tool_format == "mistral"
