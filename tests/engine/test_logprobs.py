"""Token logprobs in the engine, on real llama.cpp: computed from the logits row of each step only
when asked, and sent with the text they belong to, stop strings included."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.engine.base import Finished, SamplingParams, TextChunk, TokenLogprob
from appliance.engine.pool import EnginePool
from appliance.engine.router import Router
from appliance.runtime import Runtime
from tests.engine.routers import make_router


@pytest.fixture
def pool(runtime: Runtime, tiny_gguf: Path, context: Context) -> Iterator[Router]:
    runtime.models.import_file(tiny_gguf, context, name="tiny")
    opened = make_router(runtime, parallel=2)
    yield opened
    opened.close()


def generate(
    pool: Router, sampling: SamplingParams, *, stop: tuple[str, ...] = (), max_tokens: int = 40
) -> tuple[list[TextChunk], Finished]:
    engine = pool.engine
    assert isinstance(engine, EnginePool)
    _, spec = pool.resolve("tiny")
    loaded, _ = engine.acquire(spec)

    async def main() -> tuple[list[TextChunk], Finished]:
        chunks: list[TextChunk] = []
        stream = engine.stream_tokens(
            loaded, loaded.tokenize("hello"), max_tokens=max_tokens, sampling=sampling, stop=stop
        )
        async for event in stream:
            if isinstance(event, Finished):
                return chunks, event
            chunks.append(event)
        raise AssertionError("no Finished event")

    try:
        return asyncio.run(main())
    finally:
        engine.release(loaded)


def tokens(chunks: list[TextChunk]) -> list[TokenLogprob]:
    return [logprob for chunk in chunks for logprob in chunk.logprobs]


def test_logprobs_are_those_of_the_chosen_tokens_and_cost_nothing_unasked(pool: Router) -> None:
    plain, _ = generate(pool, SamplingParams(temperature=0))
    assert tokens(plain) == []
    chunks, finished = generate(pool, SamplingParams(temperature=0, logprobs=3))
    assert "".join(chunk.text for chunk in chunks) == "".join(chunk.text for chunk in plain)
    logprobs = tokens(chunks)
    assert len(logprobs) == finished.completion_tokens  # 40 tokens, no end of generation among them
    text = b"".join(logprob.bytes for logprob in logprobs).decode("utf-8", errors="replace")
    assert text == "".join(chunk.text for chunk in chunks)
    for logprob in logprobs:
        assert len(logprob.top) == 3
        assert [each.logprob for each in logprob.top] == sorted(
            (each.logprob for each in logprob.top), reverse=True
        )
        # Greedy: the chosen token is the likeliest, so it heads its own alternatives.
        assert logprob.top[0].bytes == logprob.bytes
        assert math.isclose(logprob.top[0].logprob, logprob.logprob)
        assert logprob.logprob <= 0
        assert all(each.top == () for each in logprob.top)
    sampled, _ = generate(pool, SamplingParams(temperature=1.5, seed=3, logprobs=0))
    assert all(logprob.top == () and logprob.logprob <= 0 for logprob in tokens(sampled))


def test_a_stop_string_keeps_the_logprobs_of_the_text_before_it(pool: Router) -> None:
    full, _ = generate(pool, SamplingParams(temperature=0, logprobs=0), max_tokens=60)
    text = "".join(chunk.text for chunk in full)
    stop = text[10:13]
    chunks, finished = generate(pool, SamplingParams(temperature=0, logprobs=0), stop=(stop,), max_tokens=60)
    cut = "".join(chunk.text for chunk in chunks)
    assert (cut, finished.reason) == (text[: text.index(stop)], "stop")
    for chunk in chunks:  # a held token's logprob went out with the text it completed
        assert (
            b"".join(logprob.bytes for logprob in chunk.logprobs).decode("utf-8", errors="replace")
            == chunk.text
        )
    sent = tokens(chunks)
    same_start = tokens(full)[: len(sent)]
    assert [each.bytes for each in sent] == [each.bytes for each in same_start]
    # The second request reuses the first one's prompt cache and decodes only the last prompt
    # token again, in a batch of its own: the same logits to a few parts in a billion.
    assert [each.logprob for each in sent] == pytest.approx([each.logprob for each in same_start], rel=1e-6)
    assert len(sent) < finished.completion_tokens  # the stop string's own tokens are not reported
