"""What an external provider is asked (REQ-MODELS-0116): only what the client set, in OpenAI's chat
shape, and a refusal naming any field only a local model can honour."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.engine.base import ToolSet
from appliance.engine.external import external_request
from appliance.engine.service import GenerationOptions
from appliance.errors import ProviderUnsupported

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("options", "arguments", "field"),
    [
        ({"min_p": 0.05}, {}, "min_p"),
        ({"typical_p": 0.9}, {}, "typical_p"),
        ({"repeat_penalty": 1.1}, {}, "repeat_penalty"),
        ({"repeat_last_n": 128}, {}, "repeat_last_n"),
        ({"mirostat": 2}, {}, "mirostat"),
        ({"mirostat_tau": 3.0}, {}, "mirostat_tau"),
        ({"mirostat_eta": 0.2}, {}, "mirostat_eta"),
        ({"context": (1, 2, 3)}, {}, "context"),
        ({"context_length": 8192}, {}, "num_ctx"),
        ({"think": True}, {}, "think"),
        ({"think": False}, {}, "think"),
        ({}, {"prompt": "def f(", "suffix": "return x"}, "suffix"),
    ],
)
def test_what_only_a_local_model_honours_is_refused_by_name(
    options: dict[str, Any], arguments: dict[str, Any], field: str
) -> None:
    with pytest.raises(ProviderUnsupported) as refused:
        external_request("gpt-4o", GenerationOptions(**options), provider="openai", **arguments)
    assert refused.value.message.startswith(f"{field} is not supported by external provider openai (")
    assert refused.value.hint == f"leave {field} out, or ask for a local model"


def test_neutral_values_and_implied_defaults_are_not_sent() -> None:
    """A sampler at the value that leaves it out asks for nothing; a default the client's API
    implies is the provider's own to choose."""
    options = GenerationOptions(
        temperature=1.0,
        top_p=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.5,
        repeat_penalty=1.0,
        mirostat=0,
        implied=frozenset({"temperature", "top_p", "frequency_penalty"}),
    )
    request = external_request(
        "gpt-4o", options, provider="openai", messages=[{"role": "user", "content": "hi"}]
    )
    assert (request.temperature, request.top_p, request.presence_penalty, request.frequency_penalty) == (
        None,
        None,
        None,
        None,
    )


def test_what_the_client_set_goes_out() -> None:
    tools = ToolSet((WEATHER,), required=True)
    options = GenerationOptions(
        max_tokens=12,
        temperature=0.3,
        top_p=0.9,
        top_k=20,
        stop=("END",),
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        json_schema={"type": "object"},
        tools=tools,
        logprobs=2,
        keep_alive=60.0,  # a local model's residency: nothing to send
    )
    request = external_request(
        "gpt-4o", options, provider="openai", messages=[{"role": "user", "content": "hi"}]
    )
    assert request.model == "gpt-4o"
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (12, 0.3, 0.9, 20)
    assert (request.stop, request.seed, request.presence_penalty, request.frequency_penalty) == (
        ("END",),
        7,
        0.5,
        -0.5,
    )
    assert (request.json_schema, request.tools, request.logprobs) == ({"type": "object"}, tools, 2)
    completion = external_request("gpt-4o", GenerationOptions(), provider="openai", prompt="Once")
    assert (completion.prompt, completion.messages) == ("Once", None)


def test_messages_leave_in_openai_chat_shape() -> None:
    """Calls as chat templates read them (arguments an object) leave as OpenAI sends them (a JSON
    string); an earlier answer's reasoning stays here."""
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "They want the weather.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ]
    request = external_request("gpt-4o", GenerationOptions(), provider="openai", messages=turns)
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "call_1"},
    ]
