"""The engine in-process: continuous batching, cancellation, keep-alive and LRU unload, on real llama.cpp."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.engine.batcher import Finished, GenerationRequest, TextChunk, _stop_prefix_length
from appliance.engine.llama import SamplingParams
from appliance.engine.pool import EnginePool, estimate_memory
from appliance.errors import EngineBusy, InsufficientMemory, ModelNotLoadable, PromptTooLong
from appliance.runtime import Runtime
from appliance.settings import EngineSettings
from tests.tiny_model import write_llama_gguf

GREEDY = SamplingParams(temperature=0)


def make_pool(runtime: Runtime, **settings: object) -> EnginePool:
    return EnginePool(EngineSettings(**settings), runtime.models, runtime.cache)  # type: ignore[arg-type]


@pytest.fixture
def long_context_model(runtime: Runtime, tmp_path: Path, context: Context) -> str:
    """A tiny model with a 4096-token context, so one request can run long enough to watch."""
    path = write_llama_gguf(tmp_path / "long.gguf", context=4096)
    runtime.models.import_file(path, context, name="long")
    return "long"


@pytest.fixture
def tiny(runtime: Runtime, tiny_gguf: Path, context: Context) -> str:
    runtime.models.import_file(tiny_gguf, context, name="tiny")
    return "tiny"


@pytest.fixture
def pool(runtime: Runtime) -> Iterator[EnginePool]:
    opened = make_pool(runtime, parallel=4)
    yield opened
    opened.close()


async def run(
    pool: EnginePool,
    name: str,
    prompt: str,
    *,
    max_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop: tuple[str, ...] = (),
) -> tuple[str, Finished, list[float]]:
    loaded, _ = pool.acquire(name)
    try:
        times: list[float] = []
        parts: list[str] = []
        async for event in pool.generate(
            loaded, loaded.tokenize(prompt), max_tokens=max_tokens, sampling=sampling, stop=stop
        ):
            times.append(time.monotonic())
            if isinstance(event, TextChunk):
                parts.append(event.text)
            else:
                return "".join(parts), event, times
    finally:
        pool.release(loaded)
    raise AssertionError("no Finished event")


def test_requests_are_decoded_together_not_one_after_another(
    pool: EnginePool, long_context_model: str
) -> None:
    async def main() -> list[tuple[str, Finished, list[float]]]:
        return await asyncio.gather(
            *(run(pool, long_context_model, f"request {index}", max_tokens=300) for index in range(4))
        )

    results = asyncio.run(main())
    assert [finished.completion_tokens for _, finished, _ in results] == [300] * 4
    first_tokens = [times[0] for _, _, times in results]
    last_tokens = [times[-1] for _, _, times in results]
    # Served one after another, a request's first token would come after the previous one's last.
    assert max(first_tokens) < min(last_tokens)


def test_greedy_output_is_reproducible_and_seeded_sampling_too(pool: EnginePool, tiny: str) -> None:
    first = asyncio.run(run(pool, tiny, "hello", max_tokens=40))[0]
    assert asyncio.run(run(pool, tiny, "hello", max_tokens=40))[0] == first
    seeded = SamplingParams(temperature=1.0, seed=1234)
    assert (
        asyncio.run(run(pool, tiny, "hello", max_tokens=40, sampling=seeded))[0]
        == asyncio.run(run(pool, tiny, "hello", max_tokens=40, sampling=seeded))[0]
    )


def test_stop_strings_end_the_text_before_them(pool: EnginePool, tiny: str) -> None:
    full, _, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=60))
    assert len(full) > 12
    stop = full[8:11]
    cut, finished, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=60, stop=(stop,)))
    assert cut == full[: full.index(stop)]
    assert finished.reason == "stop"


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [
        ("abc", ("cde",), 1),
        ("abcd", ("cde",), 2),
        ("abc", ("xyz",), 0),
        ("ab", ("b", "abx"), 2),
        ("", ("a",), 0),
    ],
)
def test_stop_prefix_length(text: str, stops: tuple[str, ...], held: int) -> None:
    assert _stop_prefix_length(text, stops) == held


def test_a_cancelled_request_frees_its_sequence(runtime: Runtime, long_context_model: str) -> None:
    pool = make_pool(runtime, parallel=1)
    try:
        loaded, _ = pool.acquire(long_context_model)

        async def abandon() -> None:
            stream = pool.generate(loaded, loaded.tokenize("x"), max_tokens=4000, sampling=GREEDY)
            async for event in stream:
                if isinstance(event, TextChunk):
                    break
            await stream.aclose()  # what a client disconnect does

        asyncio.run(abandon())
        pool.release(loaded)
        # With one sequence, a second request only runs if the first one's slot came back.
        _, finished, _ = asyncio.run(run(pool, long_context_model, "y", max_tokens=5))
        assert finished.completion_tokens == 5
        deadline = time.monotonic() + 5
        while loaded.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loaded.batcher.active == 0
    finally:
        pool.close()


def test_a_full_queue_answers_busy(runtime: Runtime, long_context_model: str) -> None:
    pool = make_pool(runtime, parallel=1, queue_size=1)
    try:
        loaded, _ = pool.acquire(long_context_model)
        finished = threading.Event()

        def request(max_tokens: int) -> GenerationRequest:
            return GenerationRequest(
                prompt=loaded.tokenize("x"),
                max_tokens=max_tokens,
                sampling=GREEDY,
                emit=lambda event: finished.set() if isinstance(event, Finished) else None,
            )

        running = request(4000)
        loaded.batcher.submit(running)
        deadline = time.monotonic() + 5
        while loaded.batcher.active == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        loaded.batcher.submit(request(1))  # waits in the queue
        with pytest.raises(EngineBusy, match="already waiting"):
            loaded.batcher.submit(request(1))
        running.cancelled.set()
        loaded.batcher.wake()
        pool.release(loaded)
    finally:
        pool.close()


def test_a_prompt_longer_than_the_context_is_refused(pool: EnginePool, tiny: str) -> None:
    loaded, _ = pool.acquire(tiny)
    try:
        with pytest.raises(PromptTooLong, match="context holds 256"):
            loaded.batcher.submit(
                GenerationRequest(prompt=[1] * 300, max_tokens=1, sampling=GREEDY, emit=lambda event: None)
            )
    finally:
        pool.release(loaded)


def test_context_length_from_a_preference_capped_at_the_models(
    runtime: Runtime, pool: EnginePool, long_context_model: str
) -> None:
    assert pool.load(long_context_model, keep_alive=0).seq_ctx == 4096
    runtime.store.set_preference("engine.context_length", 1024, actor="test")
    assert pool.load(long_context_model, keep_alive=0).seq_ctx == 1024
    runtime.store.set_preference("engine.context_length", 100_000, actor="test")
    assert pool.load(long_context_model, keep_alive=0).seq_ctx == 4096


def test_a_request_for_another_context_reloads_an_idle_model_only(
    pool: EnginePool, long_context_model: str
) -> None:
    assert pool.load(long_context_model, keep_alive=-1, context_length=512).seq_ctx == 512
    same, route = pool.acquire(long_context_model, context_length=512)
    assert route.reason == "the model was already loaded"
    # In use: a request for another context is served by the loaded model, not by a reload.
    busy, route = pool.acquire(long_context_model, context_length=2048)
    assert busy is same
    assert busy.seq_ctx == 512
    pool.release(busy, keep_alive=-1)
    pool.release(same, keep_alive=-1)
    # Idle: reloaded, capped at the 4096 tokens the model was trained for.
    reloaded, route = pool.acquire(long_context_model, context_length=100_000)
    assert reloaded is not same
    assert reloaded.seq_ctx == 4096
    assert route.reason == "reloaded with the requested context of 4096 tokens"
    pool.release(reloaded, keep_alive=-1)
    # No request for a context: whatever is loaded serves.
    assert pool.load(long_context_model).seq_ctx == 4096
    assert [loaded.seq_ctx for loaded in pool.loaded()] == [4096]


def test_idle_models_unload_after_keep_alive(pool: EnginePool, tiny: str) -> None:
    pool.load(tiny, keep_alive=0.3)
    assert [str(loaded.name) for loaded in pool.loaded()] == ["tiny:latest"]
    deadline = time.monotonic() + 5
    while pool.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.loaded() == []
    pool.load(tiny, keep_alive=-1)
    time.sleep(1.0)
    assert len(pool.loaded()) == 1  # a negative keep-alive keeps it


def test_keep_alive_zero_unloads_as_soon_as_the_request_ends(pool: EnginePool, tiny: str) -> None:
    loaded, _ = pool.acquire(tiny)
    pool.release(loaded, keep_alive=0)
    assert pool.loaded() == []


@pytest.fixture
def room_for_one(runtime: Runtime, tiny: str, tmp_path: Path, context: Context) -> Iterator[EnginePool]:
    """Two models, "tiny" and "other", and a pool whose budget holds one of them."""
    runtime.models.import_file(write_llama_gguf(tmp_path / "other.gguf", seed=3), context, name="other")
    model = runtime.models.get(tiny)
    one = estimate_memory(model.capabilities, weights=model.size_bytes, n_ctx=256 * 4)
    pool = make_pool(runtime, parallel=4, memory_budget=int(one * 1.5))
    yield pool
    pool.close()


def test_a_second_model_past_the_budget_unloads_the_least_recently_used(room_for_one: EnginePool) -> None:
    room_for_one.load("tiny")
    room_for_one.load("other")
    assert [str(loaded.name) for loaded in room_for_one.loaded()] == ["other:latest"]


def test_a_model_in_use_is_never_unloaded_to_make_room(room_for_one: EnginePool) -> None:
    held, _ = room_for_one.acquire("tiny")
    with pytest.raises(InsufficientMemory, match="serving requests"):
        room_for_one.load("other")
    room_for_one.release(held)


def test_a_model_larger_than_the_budget_is_refused(runtime: Runtime, tiny: str) -> None:
    model = runtime.models.get(tiny)
    too_small = make_pool(runtime, memory_budget=model.size_bytes)
    try:
        with pytest.raises(InsufficientMemory, match="budget"):
            too_small.load(tiny)
    finally:
        too_small.close()


def test_only_gguf_models_are_loadable(
    runtime: Runtime, pool: EnginePool, tmp_path: Path, context: Context
) -> None:
    from tests.models.test_service import write_safetensors

    runtime.models.import_file(write_safetensors(tmp_path / "m.safetensors"), context, name="st")
    with pytest.raises(ModelNotLoadable, match="no GGUF file"):
        pool.load("st")


def test_a_quarantined_model_is_never_loaded(
    runtime: Runtime, pool: EnginePool, tiny: str, context: Context
) -> None:
    blob = runtime.cache.path(runtime.models.get(tiny).artifacts[0].digest)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    assert not runtime.models.verify(context)[0].ok
    with pytest.raises(ModelNotLoadable, match="quarantined"):
        pool.load(tiny)


def test_embeddings(pool: EnginePool, tiny: str) -> None:
    loaded = pool.load(tiny)
    vectors, tokens = pool.embed(loaded, ["hello", "world"])
    assert [len(vector) for vector in vectors] == [64, 64]
    assert vectors[0] != vectors[1]
    assert tokens > 2


def test_a_removed_model_in_use_leaves_the_pool_at_once_and_unloads_when_released(
    room_for_one: EnginePool, tiny: str, context: Context
) -> None:
    """Its memory still counts while it serves, so a model loaded meanwhile cannot overcommit."""
    pool = room_for_one
    loaded, _ = pool.acquire(tiny)
    assert pool.remove_model(tiny, context) > 0
    assert pool.loaded() == []  # no longer listed, nor offered to new requests
    with pytest.raises(InsufficientMemory):
        pool.acquire("other")
    pool.release(loaded)  # its last request ended: unloaded, its memory free
    other, _ = pool.acquire("other")
    pool.release(other)
    assert [str(model.name) for model in pool.loaded()] == ["other:latest"]
