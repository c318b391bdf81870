"""``suffix`` (fill in the middle) on ``/api/generate`` and ``/v1/completions``, and ``context`` on
``/api/generate``, with the real ``ollama`` and ``openai`` clients against a live server.

The tiny ``coder`` model names three byte tokens as its FIM tokens (prefix 3, suffix 4, middle 5,
after ``<s>`` 1), so the returned context shows how the prompt was built, token by token."""

from __future__ import annotations

import uuid
from pathlib import Path

import ollama
import openai
import pytest

from tests.conftest import Server
from tests.tiny_model import TINY_CHAT_TEMPLATE
from tests.web.conftest import ran, shared_import

BOS, FIM_PRE, FIM_SUF, FIM_MID = 1, 3, 4, 5
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module: its tests only ask, and each reads only its own answers."""
    return shared_server


@pytest.fixture(scope="module")
def coder(shared_data_dir: Path) -> str:
    shared_import(shared_data_dir, "coder", TINY_CHAT_TEMPLATE, fim=True)
    shared_import(shared_data_dir, "tiny", TINY_CHAT_TEMPLATE)
    return "coder"


def fim_layout(context: list[int], prompt_tokens: int) -> list[int]:
    """Where the FIM tokens sit in the prompt's part of a context."""
    return [token for token in context[:prompt_tokens] if token in (BOS, FIM_PRE, FIM_SUF, FIM_MID)]


def test_suffix_builds_the_prompt_from_the_fim_tokens(ollama_client: ollama.Client, coder: str) -> None:
    answer = ollama_client.generate(
        model=coder, prompt="def add(a, b):", suffix="\n    return c", options=GREEDY
    )
    assert answer.done
    assert answer.eval_count == 6
    assert answer.context is not None
    assert answer.prompt_eval_count is not None
    prompt = answer.context[: answer.prompt_eval_count]
    assert prompt[:2] == [BOS, FIM_PRE]
    assert prompt[-1] == FIM_MID
    assert fim_layout(answer.context, answer.prompt_eval_count) == [BOS, FIM_PRE, FIM_SUF, FIM_MID]
    # ... the same whether the client asks for raw (Continue does) and whether it streams
    raw = ollama_client.generate(
        model=coder, prompt="def add(a, b):", suffix="\n    return c", raw=True, options=GREEDY
    )
    assert (raw.response, raw.context) == (answer.response, answer.context)
    streamed = list(
        ollama_client.generate(
            model=coder, prompt="def add(a, b):", suffix="\n    return c", options=GREEDY, stream=True
        )
    )
    assert "".join(part.response for part in streamed) == answer.response
    assert streamed[-1].context == answer.context


def test_openai_completions_fill_in_the_middle(
    openai_client: openai.OpenAI, ollama_client: ollama.Client, coder: str
) -> None:
    completion = openai_client.completions.create(
        model=coder, prompt="def add(a, b):", suffix="\n    return c", max_tokens=6, temperature=0
    )
    ollama_answer = ollama_client.generate(
        model=coder, prompt="def add(a, b):", suffix="\n    return c", raw=True, options=GREEDY
    )
    assert completion.choices[0].text == ollama_answer.response
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == ollama_answer.prompt_eval_count
    plain = openai_client.completions.create(
        model=coder, prompt="def add(a, b):", max_tokens=6, temperature=0
    )
    assert plain.usage is not None
    assert plain.usage.prompt_tokens < completion.usage.prompt_tokens


def test_suffix_on_a_model_without_fim_tokens_is_refused(
    ollama_client: ollama.Client, openai_client: openai.OpenAI, server: Server, coder: str
) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.generate(model="tiny", prompt="def add(a, b):", suffix="return c")
    assert refused.value.status_code == 400
    assert "suffix is not supported by this model: it has no fill-in-the-middle tokens" in refused.value.error
    with pytest.raises(openai.BadRequestError) as openai_refused:
        openai_client.completions.create(model="tiny", prompt="x", suffix="y", max_tokens=2)
    assert "suffix is not supported by this model" in openai_refused.value.body["message"]  # type: ignore[index]
    with_system = server.client.post(
        "/api/generate", json={"model": coder, "prompt": "x", "suffix": "y", "system": "be brief"}
    )
    assert with_system.status_code == 400
    assert "system cannot be combined with suffix" in with_system.json()["error"]
    thinking = server.client.post(
        "/api/generate", json={"model": coder, "prompt": "x", "suffix": "y", "think": True}
    )
    assert thinking.status_code == 400
    assert "think cannot be combined with suffix" in thinking.json()["error"]


def test_context_holds_the_prompt_and_answer_and_continues(ollama_client: ollama.Client, coder: str) -> None:
    first = ollama_client.generate(model=coder, prompt="hi", options=GREEDY)
    assert first.context is not None
    assert first.prompt_eval_count is not None
    assert first.context[0] == BOS
    assert len(first.context) >= first.prompt_eval_count + 1  # the answer's tokens follow the prompt's
    follow_up = ollama_client.generate(model=coder, prompt="and then?", context=first.context, options=GREEDY)
    assert follow_up.context is not None
    assert follow_up.prompt_eval_count is not None
    assert follow_up.context[: len(first.context)] == first.context
    assert follow_up.prompt_eval_count > len(first.context)
    assert follow_up.context.count(BOS) == 1  # the follow-up's prompt does not start over
    raw = ollama_client.generate(model=coder, prompt="hi", raw=True, options=GREEDY)
    assert raw.context is not None
    assert raw.context[0] == BOS
    streamed = list(ollama_client.generate(model=coder, prompt="hi", options=GREEDY, stream=True))
    assert streamed[-1].context == first.context


@pytest.mark.parametrize("token", [-1, 100_000])
def test_context_tokens_outside_the_vocabulary_are_refused(server: Server, coder: str, token: int) -> None:
    request_id = uuid.uuid4().hex
    with (
        ollama.Client(host=server.url, timeout=60, headers={"X-Request-ID": request_id}) as client,
        pytest.raises(ollama.ResponseError) as refused,
    ):
        client.generate(model=coder, prompt="hi", context=[BOS, token])
    assert refused.value.status_code == 400
    assert f"context.1 is token {token}, outside this model's vocabulary of 260 tokens" in refused.value.error
    assert ran(server, request_id) == []  # nothing ran
