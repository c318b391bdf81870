"""The providers' wire formats: the request each kind gets (and what it refuses), the streams read
back as engine events, and the key scrubber's hold across chunks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.egress import adapters
from appliance.egress.scrub import HeldText, Scrubber
from appliance.egress.streams import (
    AnthropicStream,
    OpenAIStream,
    StreamBroken,
    StreamError,
    error_message,
    model_ids,
    read_events,
)
from appliance.egress.types import ExternalRequest, Provider
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, ToolCall, ToolSet
from appliance.errors import ProviderUnsupported

OPENAI = Provider(name="oai", kind="openai", base_url="http://lan:8000/v1/")
ANTHROPIC = Provider(name="claude", kind="anthropic", base_url="https://api.anthropic.com")
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "description": "Forecast", "parameters": {"type": "object"}},
}

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
        ],
    },
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "weather", "arguments": {"city": "Rome"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    {"role": "tool", "tool_call_id": "call_2", "content": "sun"},
    {"role": "user", "content": "Thanks."},
]


def test_urls_and_headers_per_kind() -> None:
    assert adapters.models_request(OPENAI).url == "http://lan:8000/v1/models"
    assert adapters.models_request(ANTHROPIC).url == "https://api.anthropic.com/v1/models"
    assert (
        adapters.chat_request(OPENAI, ExternalRequest("m", messages=[])).url
        == "http://lan:8000/v1/chat/completions"
    )
    assert adapters.chat_request(ANTHROPIC, ExternalRequest("m", messages=[])).url == (
        "https://api.anthropic.com/v1/messages"
    )
    assert adapters.embed_request(OPENAI, "e", ["x"]).url == "http://lan:8000/v1/embeddings"
    assert adapters.headers(OPENAI, "sk-1") == {"Authorization": "Bearer sk-1"}
    assert adapters.headers(OPENAI, None) == {}
    assert adapters.headers(ANTHROPIC, "sk-1") == {"anthropic-version": "2023-06-01", "x-api-key": "sk-1"}
    assert adapters.headers(ANTHROPIC, None) == {"anthropic-version": "2023-06-01"}


def test_openai_body_carries_only_what_the_client_set() -> None:
    bare = adapters.chat_request(OPENAI, ExternalRequest("gpt", messages=[{"role": "user", "content": "hi"}]))
    assert bare.body == {
        "model": "gpt",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    full = ExternalRequest(
        "gpt",
        messages=CONVERSATION,
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop=("END",),
        seed=4,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        json_schema={"type": "object"},
        tools=ToolSet(tools=(WEATHER,), function="weather", parallel=False),
    )
    body = adapters.chat_request(OPENAI, full).body
    assert body is not None
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed")} == {
        "max_tokens": 9,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 4,
    }
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}},
    }
    assert body["tools"] == [WEATHER]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["parallel_tool_calls"] is False
    # a chat template's object arguments go back as OpenAI's JSON string
    calls = body["messages"][3]["tool_calls"]
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [
        {"city": "Oslo"},
        {"city": "Rome"},
    ]
    assert body["messages"][4] == {"role": "tool", "content": "rain", "tool_call_id": "call_1"}
    required = ExternalRequest(
        "gpt", messages=[], tools=ToolSet(tools=(WEATHER,), required=True), json_mode=True
    )
    body = adapters.chat_request(OPENAI, required).body
    assert body is not None
    assert (body["tool_choice"], body["response_format"]) == ("required", {"type": "json_object"})


def test_anthropic_body_from_an_openai_conversation() -> None:
    request = ExternalRequest(
        "claude-x",
        messages=CONVERSATION,
        temperature=0.3,
        top_k=20,
        stop=("END",),
        json_schema={"type": "object"},
        tools=ToolSet(tools=(WEATHER,), required=True, parallel=False),
    )
    body = adapters.chat_request(ANTHROPIC, request).body
    assert body is not None
    assert body["system"] == "Be brief.\n\nUse tools."
    assert body["max_tokens"] == adapters.ANTHROPIC_MAX_TOKENS  # required there: a default is sent
    assert (body["temperature"], body["top_k"], body["stop_sequences"]) == (0.3, 20, ["END"])
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    assert body["tools"] == [
        {"name": "weather", "input_schema": {"type": "object"}, "description": "Forecast"}
    ]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {  # both results and the next user text: one user turn
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "rain"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "sun"},
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]


def test_an_image_by_url_and_a_named_tool_for_anthropic() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}
    request = ExternalRequest(
        "c",
        messages=[{"role": "user", "content": [image]}],
        tools=ToolSet(tools=(WEATHER,), function="weather"),
    )
    body = adapters.chat_request(ANTHROPIC, request).body
    assert body is not None
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": "https://example.org/cat.png"}}
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "weather"}


@pytest.mark.parametrize(
    ("provider", "field", "request_"),
    [
        (OPENAI, "top_k", ExternalRequest("m", messages=[], top_k=5)),
        (OPENAI, "logprobs", ExternalRequest("m", messages=[], logprobs=2)),
        (ANTHROPIC, "seed", ExternalRequest("m", messages=[], seed=1)),
        (ANTHROPIC, "presence_penalty", ExternalRequest("m", messages=[], presence_penalty=0.5)),
        (ANTHROPIC, "frequency_penalty", ExternalRequest("m", messages=[], frequency_penalty=0.5)),
        (ANTHROPIC, "json_mode", ExternalRequest("m", messages=[], json_mode=True)),
        (ANTHROPIC, "logprobs", ExternalRequest("m", messages=[], logprobs=0)),
    ],
)
def test_a_field_the_kind_cannot_honour_is_refused_by_name(
    provider: Provider, field: str, request_: ExternalRequest
) -> None:
    with pytest.raises(ProviderUnsupported, match=f"^{field} is not supported by provider {provider.name}"):
        adapters.chat_request(provider, request_)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "'input_audio' cannot be sent",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]},
            "base64 data URL",
        ),
        (
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]},
            "only hold text",
        ),
        ({"role": "narrator", "content": "hi"}, "role 'narrator' cannot be sent"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]},
            "must be a JSON object",
        ),
    ],
)
def test_anthropic_refuses_what_it_cannot_take(message: dict[str, Any], error: str) -> None:
    with pytest.raises(ProviderUnsupported, match=error):
        adapters.chat_request(ANTHROPIC, ExternalRequest("c", messages=[message]))


def test_completions_are_openai_only_and_plain() -> None:
    body = adapters.complete_request(OPENAI, ExternalRequest("m", prompt="Once", max_tokens=3)).body
    assert body == {
        "model": "m",
        "prompt": "Once",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with pytest.raises(ProviderUnsupported, match="json_mode is not supported"):
        adapters.complete_request(OPENAI, ExternalRequest("m", prompt="x", json_mode=True))
    with pytest.raises(ProviderUnsupported, match="needs a prompt"):
        adapters.complete_request(OPENAI, ExternalRequest("m", messages=[]))
    with pytest.raises(ProviderUnsupported, match="needs messages"):
        adapters.chat_request(OPENAI, ExternalRequest("m", prompt="x"))


async def _lines(text: str) -> AsyncIterator[str]:
    for line in text.split("\n"):
        yield line


def events_of(text: str) -> list[tuple[str, str]]:
    async def collect() -> list[tuple[str, str]]:
        return [pair async for pair in read_events(_lines(text))]

    return asyncio.run(collect())


def test_server_sent_events_are_read_field_by_field() -> None:
    text = ": a comment\nevent: ping\ndata: {}\n\ndata: one\ndata: two\n\nevent:x\ndata:tight\n\ndata: last"
    assert events_of(text) == [("ping", "{}"), ("message", "one\ntwo"), ("x", "tight"), ("message", "last")]


def feed_all(
    decoder: OpenAIStream | AnthropicStream, events: list[tuple[str, dict[str, Any] | str]]
) -> list[Any]:
    out: list[Any] = []
    for name, data in events:
        out.extend(decoder.feed(name, data if isinstance(data, str) else json.dumps(data)))
    return out


def _delta(delta: dict[str, Any], finish: str | None = None) -> tuple[str, dict[str, Any]]:
    return "message", {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_openai_stream_assembles_parallel_calls_and_reasoning() -> None:
    decoder = OpenAIStream()
    out = feed_all(
        decoder,
        [
            _delta({"role": "assistant", "content": ""}),
            _delta({"reasoning_content": "hmm"}),
            _delta({"reasoning": " ok"}),  # vLLM's and OpenRouter's name for it
            _delta(
                {"tool_calls": [{"index": 0, "id": "call_x", "function": {"name": "a", "arguments": '{"n"'}}]}
            ),
            _delta(
                {"tool_calls": [{"index": 1, "id": "call_y", "function": {"name": "b", "arguments": ""}}]}
            ),
            _delta({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
            _delta({}, "stop"),  # some servers say stop after calls
            ("message", {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 8}}),
            ("message", "[DONE]"),
        ],
    )
    assert out == [
        ReasoningChunk("hmm"),
        ReasoningChunk(" ok"),
        ToolCall("call_x", "a", {"n": 1}),
        ToolCall("call_y", "b", {}),
    ]
    assert decoder.finish() == Finished("tool_calls", 5, 8)


@pytest.mark.parametrize(
    ("finish", "reason"), [("stop", "stop"), ("length", "length"), ("content_filter", "stop")]
)
def test_openai_finish_reasons(finish: str, reason: str) -> None:
    decoder = OpenAIStream()
    feed_all(decoder, [_delta({"content": "x"}, finish), ("message", "[DONE]")])
    assert decoder.finish().reason == reason


@pytest.mark.parametrize(
    ("events", "error"),
    [
        ([_delta({"content": "x"})], "ended before \\[DONE\\]"),
        ([("message", "{not json")], "not JSON"),
        (
            [
                _delta(
                    {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}]},
                    "tool_calls",
                )
            ],
            "arguments of its call to f are not JSON",
        ),
    ],
)
def test_openai_stream_that_makes_no_sense_is_broken(events: list[Any], error: str) -> None:
    def decode() -> Finished:
        decoder = OpenAIStream()
        feed_all(decoder, events)
        return decoder.finish()

    with pytest.raises(StreamBroken, match=error):
        decode()


def test_openai_error_in_the_stream() -> None:
    with pytest.raises(StreamError, match="quota exceeded"):
        feed_all(OpenAIStream(), [("message", {"error": {"message": "quota exceeded"}})])


def _anthropic_events(stop_reason: str, stop_sequence: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 3, "cache_read_input_tokens": 4}},
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}},
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "so"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "x"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": 6},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


@pytest.mark.parametrize(
    ("stop_reason", "reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("refusal", "stop")],
)
def test_anthropic_stream_and_its_stop_reasons(stop_reason: str, reason: str) -> None:
    decoder = AnthropicStream()
    sequence = "END" if stop_reason == "stop_sequence" else None
    out = feed_all(decoder, [*_anthropic_events(stop_reason, sequence)])
    assert out == [ReasoningChunk("so"), TextChunk("Hi")]
    assert decoder.finish() == Finished(reason, 7, 6, stop_sequence=sequence, cached_tokens=4)


def test_anthropic_tool_use_block_becomes_a_call_at_its_stop() -> None:
    decoder = AnthropicStream()
    block = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}
    start = ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
    pieces = [
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": part},
            },
        )
        for part in ('{"ci', 'ty": "Oslo"}')
    ]
    stop = ("content_block_stop", {"type": "content_block_stop", "index": 0})
    assert feed_all(decoder, [start, *pieces]) == []  # nothing until the block is whole
    assert feed_all(decoder, [stop]) == [ToolCall("toolu_1", "weather", {"city": "Oslo"})]
    feed_all(
        decoder,
        [
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "tool_use"},
                    "usage": {"output_tokens": 2},
                },
            )
        ],
    )
    with pytest.raises(StreamBroken, match="message_stop"):
        decoder.finish()


@pytest.mark.parametrize(
    ("kind", "retryable"), [("overloaded_error", True), ("invalid_request_error", False)]
)
def test_anthropic_error_event(kind: str, retryable: bool) -> None:
    with pytest.raises(StreamError, match="Overloaded") as raised:
        feed_all(
            AnthropicStream(),
            [("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})],
        )
    assert raised.value.retryable is retryable


def test_error_bodies_and_model_lists_of_both_kinds() -> None:
    assert error_message(b'{"error": {"message": "bad key", "type": "x"}}') == "bad key"
    assert (
        error_message(b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}')
        == "slow"
    )
    assert error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert model_ids(b'{"data": [{"id": "a"}, {"id": "b", "type": "model"}]}') == ["a", "b"]
    assert model_ids(b"[]") == []


KEYS = ["sk-abcdef123456", "sk-zz99"]


def test_scrubber_replaces_every_key_in_text_and_json() -> None:
    scrubber = Scrubber([*KEYS, None, ""])
    assert scrubber.text("a sk-abcdef123456 b sk-zz99 c sk-zz9") == "a [redacted] b [redacted] c sk-zz9"
    assert scrubber.value({"sk-zz99": ["sk-abcdef123456", 3, None]}) == {
        "[redacted]": ["[redacted]", 3, None]
    }


@pytest.mark.parametrize("size", [1, 2, 5, 9, 40])
def test_held_text_catches_a_key_cut_anywhere(size: int) -> None:
    scrubber = Scrubber(KEYS)
    whole = "start sk-abcdef123456 middle sk-zz99sk-zz99 and sk-abc, sk-zz9 end sk-"
    held = HeldText(scrubber)
    passed = [held.feed(whole[i : i + size]) for i in range(0, len(whole), size)]
    out = "".join(passed) + held.flush()
    assert out == scrubber.text(whole)
    assert "sk-abcdef123456" not in out
    assert "sk-zz99" not in out


def test_held_text_holds_only_what_could_start_a_key() -> None:
    held = HeldText(Scrubber(KEYS))
    assert held.feed("plain word") == "plain word"  # nothing like a key: nothing waits
    assert held.feed(" ends in s") == " ends in "  # an "s" may start "sk-…"
    assert held.feed(" then sk-ab") == "s then "
    assert held.feed("X") == "sk-abX"
