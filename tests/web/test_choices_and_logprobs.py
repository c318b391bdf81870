"""``n`` choices and token logprobs through the compatible APIs, driven by the real ``openai`` and
``ollama`` clients against a real server on the tiny model."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest

from tests.conftest import Server
from tests.tool_definitions import ASK, WEATHER
from tests.web.conftest import ran

HELLO: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(shared_server: Server, shared_tiny: str) -> Server:
    """One server for the module, with ``tiny``: its tests only ask, and each reads only its own
    answers."""
    return shared_server


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def ollama_client(client: openai.OpenAI, server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=60) as ollama_client:
        yield ollama_client


def joined_bytes(entries: list[Any]) -> str:
    return b"".join(bytes(entry.bytes) for entry in entries).decode("utf-8", errors="replace")


# -- n -----------------------------------------------------------------------------------------


def test_n_choices_are_decoded_together_and_seeded_ones_repeat(client: openai.OpenAI, server: Server) -> None:
    request_id = uuid.uuid4().hex

    def texts(**extra: Any) -> list[str]:
        completion = client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=8,
            temperature=1,
            extra_headers={"X-Request-ID": request_id},
            **extra,
        )
        assert [choice.index for choice in completion.choices] == list(range(len(completion.choices)))
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 8 * len(completion.choices)  # every choice counted
        return [choice.message.content or "" for choice in completion.choices]

    seeded = texts(n=3, seed=5)
    assert len(seeded) == 3
    assert texts(n=3, seed=5) == seeded  # repeatable
    assert len(set(seeded)) > 1  # seeds 5, 6 and 7: different draws
    assert texts(seed=5) == seeded[:1]  # choice 0 is what the seed alone gives
    assert len(ran(server, request_id)) == 7  # one sequence per choice


def test_n_choices_stream_interleaved_with_their_index(client: openai.OpenAI) -> None:
    request: Any = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "temperature": 1, "seed": 9, "n": 3}
    whole = [choice.message.content for choice in client.chat.completions.create(**request).choices]
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    streamed = ["", "", ""]
    finished = []
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert streamed == whole
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    indexes = [chunk.choices[0].index for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert indexes[:3] == [0, 1, 2]  # in turns, not one choice after another


def test_n_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="tiny", prompt="Once", max_tokens=6, n=2, seed=1, temperature=1
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    single = client.completions.create(model="tiny", prompt="Once", max_tokens=6, seed=1, temperature=1)
    assert completion.choices[0].text == single.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12


def test_n_choices_each_read_their_own_tool_calls(
    client: openai.OpenAI, shared_models: dict[str, str]
) -> None:
    model = shared_models["generic"]  # room for the tools in the prompt
    completion = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        n=2,
        temperature=1,
        seed=3,
        logprobs=True,
    )
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
        # The call's own tokens keep their logprobs, though no content carries their text.
        assert choice.logprobs is not None
        assert choice.logprobs.content
        assert all(entry.logprob <= 0 for entry in choice.logprobs.content)


def test_a_choice_that_cannot_start_fails_the_request_and_frees_the_others(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "word " * 400}], n=3
        )
    assert too_long.value.body["code"] == "prompt_too_long"  # type: ignore[index]
    completion = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, n=4)
    assert [choice.finish_reason for choice in completion.choices] == ["length"] * 4


# -- logprobs ----------------------------------------------------------------------------------


def test_chat_logprobs_with_alternatives(client: openai.OpenAI) -> None:
    request: Any = {"model": "tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0}
    completion = client.chat.completions.create(**request, logprobs=True, top_logprobs=3)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert content is not None
    assert len(content) == 12
    assert joined_bytes(content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is at least as likely as any listed alternative.
        assert all(entry.logprob >= alternative.logprob - 1e-9 for alternative in entry.top_logprobs)
        assert all(alternative.logprob <= 0 for alternative in entry.top_logprobs)
    assert client.chat.completions.create(**request).choices[0].logprobs is None  # only when asked

    chunks = list(client.chat.completions.create(**request, logprobs=True, top_logprobs=3, stream=True))
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content or []
    ]
    # The same tokens; the second request reuses the first one's cached prompt, whose logits may
    # differ in the last bits (a batch of another shape), hence approx.
    assert [entry.token for entry in streamed] == [entry.token for entry in content]
    assert [entry.logprob for entry in streamed] == pytest.approx(
        [entry.logprob for entry in content], rel=1e-6
    )


def test_chat_logprobs_without_alternatives(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=5, temperature=1, seed=2, logprobs=True
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert len(content) == 5
    assert all(entry.top_logprobs == [] and entry.logprob <= 0 for entry in content)


def test_legacy_completion_logprobs(client: openai.OpenAI) -> None:
    request: Any = {"model": "tiny", "prompt": "Once", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    choice = client.completions.create(**request).choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert logprobs.text_offset is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 10
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for value, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert value <= 0
        assert 1 <= len(alternatives) <= 2  # two tokens that read alike share a key
        assert value >= max(alternatives.values()) - 1e-9
    streamed = list(client.completions.create(**request, stream=True))
    tokens = [
        token
        for chunk in streamed
        if (streamed_logprobs := chunk.choices[0].logprobs) is not None
        for token in streamed_logprobs.tokens or []
    ]
    assert tokens == logprobs.tokens


def test_logprobs_errors(client: openai.OpenAI, server: Server) -> None:
    sent = {"X-Request-ID": uuid.uuid4().hex}
    for extra, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="tiny", messages=HELLO, max_tokens=2, extra_body=extra, extra_headers=sent
            )
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=21, extra_headers=sent)
    assert refused.value.body["param"] == "logprobs"  # type: ignore[index]
    assert ran(server, sent["X-Request-ID"]) == []  # nothing ran


# -- Ollama ------------------------------------------------------------------------------------


def test_ollama_logprobs(ollama_client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 8}
    whole = ollama_client.generate(model="tiny", prompt="hi", options=options, logprobs=True, top_logprobs=2)
    assert whole.logprobs is not None
    assert len(whole.logprobs) == 8
    for entry in whole.logprobs:
        assert entry.logprob <= 0
        assert entry.top_logprobs is not None
        assert len(entry.top_logprobs) == 2
        assert entry.logprob >= max(alternative.logprob for alternative in entry.top_logprobs) - 1e-9
    parts = list(
        ollama_client.generate(model="tiny", prompt="hi", options=options, logprobs=True, stream=True)
    )
    streamed = [entry for part in parts for entry in part.logprobs or []]
    assert [entry.token for entry in streamed] == [entry.token for entry in whole.logprobs]
    assert ollama_client.generate(model="tiny", prompt="hi", options=options).logprobs is None

    chat = ollama_client.chat(model="tiny", messages=HELLO, options=options, logprobs=True)
    assert chat.logprobs is not None
    assert len(chat.logprobs) == 8
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(model="tiny", messages=HELLO, options=options, top_logprobs=2)
    assert refused.value.status_code == 400
    assert "top_logprobs" in refused.value.error
