"""Tool calling through both compatible APIs, driven by the real ``openai`` and ``ollama`` clients
against a real server on tiny random-weight models (the answers are decoded, not canned).

A required or named tool_choice constrains decoding, so even random weights answer with a valid
call; with Ollama, which has no tool_choice, a ``format`` schema of the generic tool-call JSON does
the same on a model whose template cannot show tools."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.conftest import Server
from tests.engine.tool_templates import QWEN, THINKING
from tests.tiny_model import TINY_CHAT_TEMPLATE
from tests.tool_definitions import ASK, TIME, WEATHER
from tests.web.conftest import ran, shared_import

NAMED_TIME: Any = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module: its tests only ask, and each reads only its own answers."""
    return shared_server


@pytest.fixture(scope="module")
def models(shared_models: dict[str, str]) -> dict[str, str]:
    return shared_models


# -- OpenAI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["generic", "hermes"])
def test_a_required_call_comes_back_as_openai_tool_calls(
    openai_client: openai.OpenAI, models: dict[str, str], family: str
) -> None:
    completion = openai_client.chat.completions.create(
        model=models[family],
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    assert arguments in ({"city": "Paris"}, {"city": "Rome"}, {"zone": "UTC"}, {"zone": "CET"})


@pytest.mark.parametrize("family", ["generic", "hermes"])
def test_a_named_call_streams_as_delta_chunks_without_markup(
    openai_client: openai.OpenAI, models: dict[str, str], family: str
) -> None:
    stream = openai_client.chat.completions.create(
        model=models[family],
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=NAMED_TIME,
        stream=True,
    )
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            content.append(choice.delta.content)
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
        if choice.finish_reason:
            finish_reasons.append(choice.finish_reason)
    assert "".join(content) == ""  # no <tool_call> markup, no JSON leaks into the text
    assert finish_reasons == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_time"
    assert json.loads(calls[0]["arguments"])["zone"] in ("UTC", "CET")


def test_auto_may_answer_in_text(openai_client: openai.OpenAI, models: dict[str, str]) -> None:
    for stream in (False, True):
        response: Any = openai_client.chat.completions.create(
            model=models["hermes"],
            messages=ASK,
            tools=[WEATHER],
            max_tokens=8,
            stream=stream,
        )
        reasons = (
            [response.choices[0].finish_reason]
            if not stream
            else [c.choices[0].finish_reason for c in response]
        )
        assert set(reasons) - {None} <= {"stop", "length", "tool_calls"}


def test_a_tool_result_sent_back_is_answered(openai_client: openai.OpenAI, models: dict[str, str]) -> None:
    first = openai_client.chat.completions.create(
        model=models["hermes"],
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
    )
    called = first.choices[0].message
    assert called.tool_calls is not None
    messages: list[Any] = [
        *ASK,
        called.model_dump(exclude_none=True),  # the assistant turn as the client keeps it
        {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "21 C and sunny"},
    ]
    for family in ("hermes", "generic"):
        answer = openai_client.chat.completions.create(
            model=models[family],
            messages=messages,
            tools=[WEATHER],
            max_tokens=6,
            temperature=0,
        )
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert answer.usage is not None
        assert answer.usage.prompt_tokens > 100  # the result and the tools reached the prompt


def test_tool_choice_none_offers_no_tools(
    openai_client: openai.OpenAI, models: dict[str, str], server: Server
) -> None:
    with_tools = openai_client.chat.completions.create(
        model=models["generic"],
        messages=ASK,
        tools=[WEATHER],
        max_tokens=1,
    )
    without = openai_client.chat.completions.create(
        model=models["generic"],
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=1,
    )
    assert with_tools.usage is not None
    assert without.usage is not None
    assert without.usage.prompt_tokens < with_tools.usage.prompt_tokens - 100  # no preamble


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tool_choice": "required"}, "tool_choice asks for a tool call, but the request offers no tools"),
        ({"tools": [WEATHER], "tool_choice": NAMED_TIME}, "tool_choice names 'get_time', which is not among"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0 is not supported"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "a required tool call and a JSON response format cannot both constrain the answer",
        ),
        (
            {"messages": [*ASK, {"role": "tool", "content": "21 C"}]},
            "messages.1.tool_call_id is required",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages.0.tool_calls belong to assistant messages",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    },
                ]
            },
            "messages.1.tool_calls.0.function.arguments must be a JSON object, as a string",
        ),
    ],
)
def test_tool_requests_it_cannot_honour_are_refused(
    server: Server, models: dict[str, str], body: dict[str, Any], message: str
) -> None:
    request_id = uuid.uuid4().hex
    refused = server.client.post(
        "/v1/chat/completions",
        json={"model": models["generic"], "messages": ASK, **body},
        headers={"X-Request-ID": request_id},
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"].startswith(message)
    assert message.startswith(error["param"] or "a required")  # the field at fault, where one is
    assert ran(server, request_id) == []  # nothing ran


def test_tools_on_a_plain_completion_are_refused_by_name(server: Server, models: dict[str, str]) -> None:
    refused = server.client.post(
        "/v1/completions", json={"model": models["generic"], "prompt": "x", "tools": [WEATHER]}
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tools"


def test_langchain_bind_tools(server: Server, models: dict[str, str]) -> None:
    import langchain_openai  # imported here: it takes a while, and only this test needs it

    chat = langchain_openai.ChatOpenAI(
        model=models["hermes"], base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_retries=0
    )
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    reply = bound.invoke("Weather in Paris?")
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"]
    assert reply.tool_calls[0]["args"]["city"] in ("Paris", "Rome")


# -- Ollama ------------------------------------------------------------------------------------

# The generic format's answer as a JSON schema: Ollama's ``format`` forces it, and the reader
# takes it for the tool call it is.
GENERIC_CALL: Any = {
    "type": "object",
    "properties": {
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": WEATHER["function"]["parameters"],
                },
                "required": ["name", "arguments"],
            },
            "minItems": 1,
            "maxItems": 1,
        }
    },
    "required": ["tool_calls"],
}


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_returns_tool_calls_with_object_arguments(
    ollama_client: ollama.Client, models: dict[str, str], stream: bool
) -> None:
    options = {"temperature": 0}
    if stream:
        parts = list(
            ollama_client.chat(
                model=models["generic"],
                messages=ASK,
                tools=[WEATHER],
                format=GENERIC_CALL,
                options=options,
                stream=True,
            )
        )
        assert all(part.message.content == "" for part in parts)  # the JSON never shows as text
        calls = [call for part in parts for call in part.message.tool_calls or []]
        assert parts[-1].done
        assert parts[-1].done_reason == "stop"
    else:
        response = ollama_client.chat(
            model=models["generic"], messages=ASK, tools=[WEATHER], format=GENERIC_CALL, options=options
        )
        assert response.message.content == ""
        calls = list(response.message.tool_calls or [])
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert dict(calls[0].function.arguments) in ({"city": "Paris"}, {"city": "Rome"})


def test_ollama_tool_results_are_taken_back(ollama_client: ollama.Client, models: dict[str, str]) -> None:
    messages: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "21 C and sunny", "tool_name": "get_weather"},
    ]
    for family in ("hermes", "generic"):
        response = ollama_client.chat(
            model=models[family],
            messages=messages,
            tools=[WEATHER],
            options={"temperature": 0, "num_predict": 4},
        )
        assert response.done
        assert (response.prompt_eval_count or 0) > 100


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
            "messages.0.tool_calls",
        ),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": "x"}}],
            },
            "messages.0.tool_calls.0.function.arguments must be an object",
        ),
        (
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
            "messages.0.tool_calls.0 must be",
        ),
    ],
)
def test_ollama_refuses_malformed_tool_turns(
    server: Server, models: dict[str, str], message: dict[str, Any], error: str
) -> None:
    refused = server.client.post("/api/chat", json={"model": models["generic"], "messages": [message]})
    assert refused.status_code == 400
    assert error in refused.json()["error"]
    bad_tool = server.client.post(
        "/api/chat", json={"model": models["generic"], "messages": ASK, "tools": [{"type": "function"}]}
    )
    assert (bad_tool.status_code, bad_tool.json()["error"]) == (
        400,
        "tools.0.function is missing; send the function's name, description and parameters",
    )


def test_show_lists_what_each_template_can_do(ollama_client: ollama.Client, shared_data_dir: Path) -> None:
    shared_import(shared_data_dir, "plain", TINY_CHAT_TEMPLATE)
    shared_import(shared_data_dir, "qwen", QWEN)
    shared_import(shared_data_dir, "thinker", THINKING)
    shared_import(shared_data_dir, "coder", TINY_CHAT_TEMPLATE, fim=True)
    assert ollama_client.show("plain").capabilities == ["completion"]
    assert ollama_client.show("qwen").capabilities == ["completion", "tools"]
    assert ollama_client.show("thinker").capabilities == ["completion", "tools", "thinking"]
    assert ollama_client.show("coder").capabilities == ["completion", "insert"]
