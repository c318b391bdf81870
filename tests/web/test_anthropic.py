"""Anthropic's Messages API (``/v1/messages``), driven by the real ``anthropic`` client against a
real server on tiny random-weight models: text, stop reasons, streaming, a forced tool_use and
its tool_result answered, errors in Anthropic's shape, and API keys sent as ``x-api-key``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests import tool_definitions
from tests.conftest import Server, started_server
from tests.tiny_model import TINY_CHAT_TEMPLATE
from tests.tool_definitions import ASK, messages_tool
from tests.web.conftest import Keys, import_model, ran

WEATHER: Any = messages_tool(tool_definitions.WEATHER)
TIME: Any = messages_tool(tool_definitions.TIME)


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module: its tests only ask, and each reads only its own answers (the
    one with auth on has a server of its own)."""
    return shared_server


@pytest.fixture(scope="module")
def models(shared_models: dict[str, str]) -> dict[str, str]:
    return shared_models


@pytest.fixture
def client(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as client:
        yield client


def test_text_and_its_stop_reasons(client: anthropic.Anthropic, models: dict[str, str]) -> None:
    message = client.messages.create(
        model=models["generic"],
        system=[{"type": "text", "text": "Answer briefly."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        max_tokens=12,
        extra_body={"temperature": 0},
    )
    assert message.id.startswith("msg_")
    assert (message.type, message.role) == ("message", "assistant")
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert 0 < message.usage.output_tokens <= 12
    assert message.usage.input_tokens > 0
    [block] = message.content
    assert block.type == "text"
    text = block.text
    # A stop sequence taken from that greedy answer ends the same answer there, and is named.
    stop = text[len(text) // 2 :][:2]
    stopped = client.messages.create(
        model=models["generic"],
        system="Answer briefly.",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        stop_sequences=[stop],
        extra_body={"temperature": 0, "top_k": 1},
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    stopped_text = stopped.content[0].text if stopped.content else ""  # type: ignore[union-attr]
    assert stopped_text == text[: text.index(stop)]


def test_a_stream_adds_up_to_the_final_message(client: anthropic.Anthropic, models: dict[str, str]) -> None:
    with client.messages.stream(
        model=models["generic"],
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=10,
        extra_body={"temperature": 0},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason in ("max_tokens", "end_turn")
    assert final.usage.output_tokens > 0
    same = client.messages.create(
        model=models["generic"],
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=10,
        extra_body={"temperature": 0},
    )
    assert same.content[0].text == text  # type: ignore[union-attr]


def test_output_config_format_gives_json(client: anthropic.Anthropic, models: dict[str, str]) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    message = client.messages.create(
        model=models["generic"],
        messages=[{"role": "user", "content": "answer in JSON"}],
        max_tokens=60,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body={"temperature": 0},
    )
    assert message.content[0].type == "text"
    assert isinstance(json.loads(message.content[0].text)["ok"], bool)


@pytest.mark.parametrize("family", ["generic", "hermes"])
def test_a_forced_tool_use_and_its_result_answered(
    client: anthropic.Anthropic, models: dict[str, str], family: str
) -> None:
    called = client.messages.create(
        model=models[family],
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=200,
        extra_body={"temperature": 0},
    )
    assert called.stop_reason == "tool_use"
    [use] = [block for block in called.content if block.type == "tool_use"]
    assert use.id.startswith("toolu_")
    assert (use.name, use.input) in (("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}))
    answered = client.messages.create(
        model=models[family],
        messages=[
            *ASK,
            {"role": "assistant", "content": [block.model_dump() for block in called.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C and sunny"}],
            },
        ],
        tools=[WEATHER, TIME],
        max_tokens=6,
        extra_body={"temperature": 0},
    )
    assert answered.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert (
        answered.usage.input_tokens > called.usage.input_tokens
    )  # the call and its result reached the prompt


def test_a_streamed_tool_use_arrives_as_input_json(
    client: anthropic.Anthropic, models: dict[str, str]
) -> None:
    with client.messages.stream(
        model=models["hermes"],
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=200,
        extra_body={"temperature": 0},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start"
    assert "text" not in kinds  # no <tool_call> markup leaks as text
    assert final.stop_reason == "tool_use"
    [use] = final.content
    assert use.type == "tool_use"
    assert use.name in ("get_weather", "get_time")
    assert use.input in ({"city": "Paris"}, {"city": "Rome"}, {"zone": "UTC"}, {"zone": "CET"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_tokens": None}, "invalid request: max_tokens: Field required"),
        ({"temperature": 1.5}, "invalid request: temperature: Input should be less than or equal to 1"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking is not supported"),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools.0.type 'web_search_20250305'",
        ),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema is required"),
        ({"output_config": {"effort": "high"}}, "output_config.effort is not supported"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format must be"),
        (
            {"tool_choice": {"type": "any"}},
            "tool_choice asks for a tool call, but the request offers no tools",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, 'tool_choice must be {"type": "auto"}'),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type 'image' is not supported in a user message",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f"}]}]},
            "messages.0.content.0.type 'tool_use' is not supported in a user message",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
            "messages.0.content.0.tool_use_id is required",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 7}]}
                ]
            },
            "messages.0.content.0.content must be a string or a list of text blocks",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "invalid request: messages.0.role"),
    ],
)
def test_what_it_cannot_honour_is_refused_in_anthropics_shape(
    server: Server, models: dict[str, str], extra: dict[str, Any], message: str
) -> None:
    body = {"model": models["generic"], "max_tokens": 4, "messages": ASK, **extra}
    request_id = uuid.uuid4().hex
    refused = server.client.post(
        "/v1/messages",
        json={k: v for k, v in body.items() if v is not None},
        headers={"X-Request-ID": request_id},
    )
    assert refused.status_code == 400
    error = refused.json()
    assert (error["type"], error["error"]["type"]) == ("error", "invalid_request_error")
    assert error["error"]["message"].startswith(message)
    assert ran(server, request_id) == []  # nothing ran


def test_errors_reach_the_client_as_its_own_and_unknown_fields_pass(
    client: anthropic.Anthropic, models: dict[str, str]
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="ghost", messages=ASK, max_tokens=4)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    message = client.messages.create(
        model=models["generic"],
        messages=ASK,
        max_tokens=1,
        metadata={"user_id": "someone"},
        thinking={"type": "disabled"},
        extra_body={"some_future_field": 1},
    )
    assert message.usage.output_tokens == 1


@pytest.fixture
def secured(keys: Keys, data_dir: Path) -> Iterator[Server]:
    """A server of this test's own, with auth on (``keys``)."""
    with started_server(data_dir) as started:
        yield started


def test_api_keys_go_as_x_api_key(secured: Server, keys: Keys, data_dir: Path) -> None:
    model = import_model(data_dir, "generic", TINY_CHAT_TEMPLATE)
    with anthropic.Anthropic(base_url=secured.url, api_key=keys.user, max_retries=0) as client:
        message = client.messages.create(model=model, messages=ASK, max_tokens=1)
    assert message.usage.output_tokens == 1
    with (
        anthropic.Anthropic(base_url=secured.url, api_key="apl_wrong", max_retries=0) as client,
        pytest.raises(anthropic.AuthenticationError) as refused,
    ):
        client.messages.create(model=model, messages=ASK, max_tokens=1)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
