"""OpenAI's Responses API (``/v1/responses``), driven by the real ``openai`` client against a real
server on tiny random-weight models: text, streaming events, function tools with a required or
named choice and their output sent back, structured output, and what it refuses (it is stateless)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import openai
import pytest

from tests import tool_definitions
from tests.conftest import Server
from tests.tool_definitions import ASK, responses_tool
from tests.web.conftest import ran

WEATHER: Any = responses_tool(tool_definitions.WEATHER)
TIME: Any = responses_tool(tool_definitions.TIME)


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module: its tests only ask, and each reads only its own answers."""
    return shared_server


@pytest.fixture(scope="module")
def models(shared_models: dict[str, str]) -> dict[str, str]:
    return shared_models


def test_text_with_instructions(openai_client: openai.OpenAI, models: dict[str, str]) -> None:
    response = openai_client.responses.create(
        model=models["generic"],
        instructions="Answer briefly.",
        input="Hello",
        max_output_tokens=5,
        temperature=0,
    )
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage is not None
    assert 0 < usage.output_tokens <= 5
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.store is False  # nothing is kept
    # The same question as input items gives the same greedy answer.
    items = openai_client.responses.create(
        model=models["generic"],
        input=[
            {"role": "developer", "content": "Answer briefly."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        ],
        max_output_tokens=5,
        temperature=0,
    )
    assert items.output_text == response.output_text
    # Instructions and a developer message are one system turn, as templates expect.
    both = openai_client.responses.create(
        model=models["generic"],
        instructions="Answer",
        input=[{"role": "developer", "content": "briefly."}, {"role": "user", "content": "Hello"}],
        max_output_tokens=5,
        temperature=0,
    )
    assert both.usage is not None
    assert both.usage.input_tokens == usage.input_tokens + 1  # "\n\n" where a space was


def test_streamed_events_are_numbered_and_add_up(
    openai_client: openai.OpenAI, models: dict[str, str]
) -> None:
    events = list(
        openai_client.responses.create(
            model=models["generic"], input="Hello", max_output_tokens=8, temperature=0, stream=True
        )
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    [done] = [event for event in events if event.type == "response.output_text.done"]
    final: Any = events[-1]
    assert deltas == done.text == final.response.output_text
    assert final.response.usage.output_tokens > 0
    same = openai_client.responses.create(
        model=models["generic"], input="Hello", max_output_tokens=8, temperature=0
    )
    assert same.output_text == deltas


@pytest.mark.parametrize("family", ["generic", "hermes"])
def test_a_required_call_and_its_output_sent_back(
    openai_client: openai.OpenAI, models: dict[str, str], family: str
) -> None:
    first = openai_client.responses.create(
        model=models[family],
        input=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.call_id.startswith("call_")
    assert call.name in ("get_weather", "get_time")
    assert json.loads(call.arguments) in (
        {"city": "Paris"},
        {"city": "Rome"},
        {"zone": "UTC"},
        {"zone": "CET"},
    )
    answer = openai_client.responses.create(
        model=models[family],
        input=[
            *ASK,
            *[item.model_dump(exclude_none=True) for item in first.output],  # as the client keeps them
            {"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"},
        ],
        tools=[WEATHER, TIME],
        max_output_tokens=6,
        temperature=0,
    )
    assert answer.status in ("completed", "incomplete")
    assert answer.usage is not None
    assert first.usage is not None
    assert answer.usage.input_tokens > first.usage.input_tokens  # the call and its result reached the prompt


def test_a_named_call_streams_its_arguments(openai_client: openai.OpenAI, models: dict[str, str]) -> None:
    events = list(
        openai_client.responses.create(
            model=models["hermes"],
            input=ASK,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "name": "get_time"},
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert "response.output_text.delta" not in kinds  # no <tool_call> markup leaks as text
    added: Any = next(event for event in events if event.type == "response.output_item.added")
    assert (added.item.type, added.item.name) == ("function_call", "get_time")
    arguments = "".join(
        event.delta for event in events if event.type == "response.function_call_arguments.delta"
    )
    done: Any = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert done.arguments == arguments
    assert json.loads(arguments)["zone"] in ("UTC", "CET")
    final: Any = events[-1]
    assert final.type == "response.completed"
    [item] = final.response.output
    assert (item.call_id, item.arguments) == (added.item.call_id, arguments)


def test_text_format_json_schema(openai_client: openai.OpenAI, models: dict[str, str]) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response = openai_client.responses.create(
        model=models["generic"],
        input="answer in JSON",
        max_output_tokens=60,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
    )
    assert isinstance(json.loads(response.output_text)["ok"], bool)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"store": True}, "store", "store: true is not supported; this appliance keeps no responses"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "previous_response_id is not supported"),
        ({"conversation": "conv_1"}, "conversation", "conversation is not supported"),
        ({"background": True}, "background", "background is not supported"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning is not supported"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "tools.0.type 'web_search' is not supported"),
        ({"tool_choice": "required"}, "tool_choice", "tool_choice asks for a tool call, but the request"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function"}},
            "tool_choice",
            "tool_choice as an object",
        ),
        (
            {"text": {"format": {"type": "xml"}}},
            "text.format.type",
            "text.format type 'xml' is not supported",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0.type",
            "input.0.content.0.type 'input_image' is not supported",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]},
            "input.0.arguments",
            "input.0.arguments must be a JSON object, as a string",
        ),
        (
            {"input": [{"type": "function_call_output", "output": "21 C"}]},
            "input.0.call_id",
            "input.0.call_id is required",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type", "input.0.type 'item_reference'"),
        (
            {"input": [{"role": "tool", "content": "x"}]},
            "input.0.role",
            "input.0.role 'tool' is not supported",
        ),
    ],
)
def test_what_it_cannot_honour_is_refused_by_name(
    server: Server, models: dict[str, str], extra: dict[str, Any], param: str, message: str
) -> None:
    body = {"model": models["generic"], "input": "x", **extra}
    request_id = uuid.uuid4().hex
    refused = server.client.post("/v1/responses", json=body, headers={"X-Request-ID": request_id})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"].startswith(message)
    assert ran(server, request_id) == []  # nothing ran


def test_unknown_fields_are_accepted_and_errors_are_openai_shaped(
    openai_client: openai.OpenAI, models: dict[str, str]
) -> None:
    response = openai_client.responses.create(
        model=models["generic"],
        input="x",
        max_output_tokens=1,
        store=False,
        metadata={"ticket": "42"},
        extra_body={"safety_identifier": "someone", "some_future_field": 1},
    )
    assert response.metadata == {"ticket": "42"}
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.responses.create(model="ghost", input="x")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.responses.create(model=models["generic"], input="x", max_output_tokens=0)
    assert bad.value.body["param"] == "max_output_tokens"  # type: ignore[index]
