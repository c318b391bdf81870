"""Prompt reuse on real llama.cpp: a finished request's KV cache serves the next prompt's common
prefix, gives the same answer as decoding it all, and never outlives a failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.engine.base import Finished, SamplingParams, TextChunk
from appliance.engine.batcher import Event
from appliance.engine.llama import LlamaContext, LlamaModel
from appliance.engine.pool import EnginePool, LoadedModel
from appliance.engine.router import Router
from appliance.runtime import Runtime
from tests.engine.routers import make_router
from tests.tiny_model import write_llama_gguf

GREEDY = SamplingParams(temperature=0)
BASE = [5 + index % 50 for index in range(60)]  # a shared "system prompt" of token ids


@pytest.fixture
def model(runtime: Runtime, tmp_path: Path, context: Context) -> str:
    path = write_llama_gguf(tmp_path / "long.gguf", context=4096)
    runtime.models.import_file(path, context, name="long")
    return "long"


@pytest.fixture
def reusing(runtime: Runtime) -> Iterator[Router]:
    router = make_router(runtime, parallel=4)
    yield router
    router.close()


@pytest.fixture
def not_reusing(runtime: Runtime) -> Iterator[Router]:
    router = make_router(runtime, parallel=4, prompt_reuse=False)
    yield router
    router.close()


def acquire(router: Router, name: str) -> tuple[EnginePool, LoadedModel]:
    _, spec = router.resolve(name)
    pool = router.engine
    assert isinstance(pool, EnginePool)
    return pool, pool.acquire(spec)[0]


async def run(
    router: Router, name: str, prompt: list[int], *, max_tokens: int = 20
) -> tuple[str, Finished, list[float]]:
    pool, loaded = acquire(router, name)
    try:
        parts: list[str] = []
        times: list[float] = []
        async for event in pool.stream_tokens(loaded, prompt, max_tokens=max_tokens, sampling=GREEDY):
            times.append(time.monotonic())
            if isinstance(event, TextChunk):
                parts.append(event.text)
            else:
                return "".join(parts), event, times
    finally:
        pool.release(loaded)
    raise AssertionError("no Finished event")


def answer(router: Router, name: str, prompt: list[int], *, max_tokens: int = 20) -> tuple[str, Finished]:
    text, finished, _ = asyncio.run(run(router, name, prompt, max_tokens=max_tokens))
    return text, finished


def test_a_shared_prefix_is_reused_and_the_answer_is_the_same(
    reusing: Router, not_reusing: Router, model: str
) -> None:
    first = [*BASE, 70, 71, 72]
    second = [*BASE, 80, 81]
    assert answer(reusing, model, first)[1].cached_tokens == 0
    text, finished = answer(reusing, model, second)
    assert finished.cached_tokens == len(BASE)
    assert finished.prompt_tokens == len(second)
    fresh_text, fresh = answer(not_reusing, model, second)
    assert fresh.cached_tokens == 0
    assert text
    assert text == fresh_text
    # The same prompt again: all of it but the last token, whose logits start the answer.
    again_text, again = answer(reusing, model, second)
    assert (again_text, again.cached_tokens) == (text, len(second) - 1)


def test_the_next_turn_reuses_the_answer_too(reusing: Router, not_reusing: Router, model: str) -> None:
    first = [*BASE, 70]
    answer(reusing, model, first, max_tokens=10)
    pool, loaded = acquire(reusing, model)
    kept = loaded.batcher._kept[0]
    pool.release(loaded)
    assert kept[: len(first)] == first
    assert len(kept) > len(first)
    next_turn = [*kept, 90, 91]
    text, finished = answer(reusing, model, next_turn)
    assert finished.cached_tokens == len(kept)
    assert text == answer(not_reusing, model, next_turn)[0]


def test_a_different_prompt_reuses_nothing(reusing: Router, model: str) -> None:
    answer(reusing, model, [*BASE, 70])
    assert answer(reusing, model, [9, *BASE])[1].cached_tokens == 0


def test_reused_requests_are_still_decoded_together(reusing: Router, model: str) -> None:
    async def four(offset: int) -> list[tuple[str, Finished, list[float]]]:
        return await asyncio.gather(
            *(run(reusing, model, [*BASE, offset + index], max_tokens=300) for index in range(4))
        )

    asyncio.run(four(100))  # every sequence now holds BASE
    results = asyncio.run(four(200))
    assert [finished.cached_tokens for _, finished, _ in results] == [len(BASE)] * 4
    first_tokens = [times[0] for _, _, times in results]
    last_tokens = [times[-1] for _, _, times in results]
    assert max(first_tokens) < min(last_tokens)


def test_a_cancelled_request_leaves_only_what_it_decoded(
    reusing: Router, not_reusing: Router, model: str
) -> None:
    pool, loaded = acquire(reusing, model)
    prompt = [*BASE, 70]

    async def abandon() -> None:
        stream = pool.stream_tokens(loaded, prompt, max_tokens=4000, sampling=GREEDY)
        async for event in stream:
            if isinstance(event, TextChunk):
                break
        await stream.aclose()

    asyncio.run(abandon())
    pool.release(loaded)
    deadline = time.monotonic() + 5
    while loaded.batcher.active and time.monotonic() < deadline:
        time.sleep(0.01)
    text, finished = answer(reusing, model, prompt)
    assert finished.cached_tokens == len(prompt) - 1
    assert text == answer(not_reusing, model, prompt)[0]


def test_a_failed_decode_leaves_no_cache_behind(reusing: Router, model: str) -> None:
    answer(reusing, model, [*BASE, 70])
    pool, loaded = acquire(reusing, model)
    invalid = loaded.model.n_vocab + 10
    pool.release(loaded)
    _, failed = answer(reusing, model, [*BASE, invalid])
    assert failed.reason == "error"
    assert failed.cached_tokens == len(BASE)  # it took the cache, then the decode failed
    assert answer(reusing, model, [*BASE, 71])[1].cached_tokens == 0


def test_a_small_shared_prefix_does_not_leave_a_gap_among_busy_sequences(reusing: Router, model: str) -> None:
    pool, loaded = acquire(reusing, model)
    first_long = pool.stream_tokens(loaded, [9, 9, 9], max_tokens=4000, sampling=GREEDY)
    second_long = pool.stream_tokens(loaded, [8, 8, 8], max_tokens=4000, sampling=GREEDY)

    async def scenario() -> tuple[int, int]:
        await anext(first_long)  # sequence 0
        await anext(second_long)  # sequence 1
        await run(reusing, model, [*BASE, 70])  # sequence 2, kept
        await first_long.aclose()  # sequence 0 is free again, holding other tokens
        while loaded.batcher.active > 1:
            await asyncio.sleep(0.01)
        # One token in common with sequence 2: the lowest free one, 0, is taken instead.
        _, small, _ = await run(reusing, model, [BASE[0], *range(100, 140)])
        # Most of the prompt in common: worth taking sequence 2.
        _, large, _ = await run(reusing, model, [*BASE, 71])
        await second_long.aclose()
        return small.cached_tokens, large.cached_tokens

    try:
        assert asyncio.run(scenario()) == (0, len(BASE))
    finally:
        pool.release(loaded)


SYSTEM = [5 + index % 70 for index in range(300)]  # a system prompt long enough to be worth a copy


async def hold_generating(pool: EnginePool, loaded: LoadedModel, prompt: list[int]) -> AsyncGenerator[Event]:
    """A request that keeps its sequence busy until closed, started up to its first token."""
    stream = pool.stream_tokens(loaded, prompt, max_tokens=4000, sampling=GREEDY)
    await anext(stream)
    return stream


def test_a_busy_clients_system_prompt_is_copied_for_the_next_client(
    reusing: Router, not_reusing: Router, model: str
) -> None:
    pool, loaded = acquire(reusing, model)
    second = [*SYSTEM, 80, 81]

    async def scenario() -> tuple[str, Finished]:
        first = await hold_generating(pool, loaded, [*SYSTEM, 70])
        try:
            text, finished, _ = await run(reusing, model, second)
        finally:
            await first.aclose()
        return text, finished

    try:
        text, finished = asyncio.run(scenario())
    finally:
        pool.release(loaded)
    assert finished.cached_tokens == len(SYSTEM)
    assert text == answer(not_reusing, model, second)[0]


def test_clients_arriving_together_share_one_decoding_of_their_system_prompt(
    reusing: Router, model: str
) -> None:
    prompts = [[*SYSTEM, 90 + index, 91] for index in range(4)]

    async def together() -> list[tuple[str, Finished, list[float]]]:
        return await asyncio.gather(*(run(reusing, model, prompt) for prompt in prompts))

    results = asyncio.run(together())
    assert sorted(finished.cached_tokens for _, finished, _ in results) == [0, *[len(SYSTEM)] * 3]
    # (Their texts are not compared with the prompts decoded alone: a batch of another shape may
    # round differently and flip a near tie of this random model; the busy-client test compares.)


def test_a_short_prompt_is_answered_while_a_long_one_is_still_decoded(reusing: Router, model: str) -> None:
    long_prompt = [5 + index % 90 for index in range(3000)]

    async def both() -> tuple[float, float]:
        long_run, short_run = await asyncio.gather(
            run(reusing, model, long_prompt, max_tokens=2), run(reusing, model, [9, 8, 7], max_tokens=2)
        )
        return long_run[2][0], short_run[2][0]

    long_first, short_first = asyncio.run(both())
    assert short_first < long_first


def test_a_prefix_copy_from_a_sequence_without_its_start_leaves_the_target_empty(tmp_path: Path) -> None:
    model = LlamaModel(write_llama_gguf(tmp_path / "tiny.gguf"), n_gpu_layers=0)
    context = LlamaContext(model, n_ctx=768, n_seq=3, n_batch=128, threads=1)
    try:
        context.decode([(5 + index, index, 0, False) for index in range(10)])
        context.decode([(5 + index, index, 2, False) for index in range(4)])
        assert context.copy_prefix(0, 1, 6)
        assert context.cached_positions(1) == (0, 5)
        assert context.keep_prefix(0, 0)
        assert context.cached_positions(0) == (-1, -1)
        # sequence 0 is empty now: nothing to copy, and sequence 2 loses what it held
        assert not context.copy_prefix(0, 2, 3)
        assert context.cached_positions(2) == (-1, -1)
    finally:
        context.close()
        model.close()
