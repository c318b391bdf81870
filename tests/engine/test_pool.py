"""The engine in-process: continuous batching, cancellation, keep-alive and LRU unload, on real llama.cpp.

Name-level operations (load, remove, the context preference) go through the router, as the APIs do."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from appliance.audit import Context
from appliance.engine.base import Finished, LoadSpec, Prompt, Ready, SamplingParams, TextChunk
from appliance.engine.batcher import GenerationRequest, _stop_prefix_length
from appliance.engine.pool import EnginePool, LoadedModel, estimate_memory
from appliance.engine.router import TOUCH_EVERY, Router
from appliance.errors import EngineBusy, InsufficientMemory, ModelNotLoadable, PromptTooLong
from appliance.runtime import Runtime
from appliance.settings import EngineSettings
from tests.engine.routers import make_router
from tests.tiny_model import write_llama_gguf

GREEDY = SamplingParams(temperature=0)


def engine(router: Router) -> EnginePool:
    assert isinstance(router.engine, EnginePool)
    return router.engine


def acquire(router: Router, name: str, *, context_length: int | None = None) -> tuple[LoadedModel, str]:
    """What a request does: resolve the name, then hold the loaded model until ``release``."""
    _, spec = router.resolve(name, context_length=context_length)
    return engine(router).acquire(spec)


def loaded_names(router: Router) -> list[str]:
    return [str(loaded.name) for loaded in router.loaded()]


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
def pool(runtime: Runtime) -> Iterator[Router]:
    opened = make_router(runtime, parallel=4)
    yield opened
    opened.close()


async def run(
    pool: Router,
    name: str,
    prompt: str,
    *,
    max_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop: tuple[str, ...] = (),
) -> tuple[str, Finished, list[float]]:
    loaded, _ = acquire(pool, name)
    try:
        times: list[float] = []
        parts: list[str] = []
        async for event in engine(pool).stream_tokens(
            loaded, loaded.tokenize(prompt), max_tokens=max_tokens, sampling=sampling, stop=stop
        ):
            times.append(time.monotonic())
            if isinstance(event, TextChunk):
                parts.append(event.text)
            else:
                return "".join(parts), event, times
    finally:
        engine(pool).release(loaded)
    raise AssertionError("no Finished event")


def test_requests_are_decoded_together_not_one_after_another(pool: Router, long_context_model: str) -> None:
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


def test_greedy_output_is_reproducible_and_seeded_sampling_too(pool: Router, tiny: str) -> None:
    first = asyncio.run(run(pool, tiny, "hello", max_tokens=40))[0]
    assert asyncio.run(run(pool, tiny, "hello", max_tokens=40))[0] == first
    seeded = SamplingParams(temperature=1.0, seed=1234)
    assert (
        asyncio.run(run(pool, tiny, "hello", max_tokens=40, sampling=seeded))[0]
        == asyncio.run(run(pool, tiny, "hello", max_tokens=40, sampling=seeded))[0]
    )


def test_penalties_and_the_other_samplers_change_or_keep_the_output_as_asked(pool: Router, tiny: str) -> None:
    def text(sampling: SamplingParams) -> str:
        return asyncio.run(run(pool, tiny, "hello", max_tokens=24, sampling=sampling))[0]

    plain = text(GREEDY)
    assert text(SamplingParams(temperature=0, repeat_penalty=50.0, repeat_last_n=-1)) != plain
    assert text(SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0)) != plain
    assert text(SamplingParams(temperature=0, repeat_penalty=50.0, repeat_last_n=0)) == plain  # 0: off
    for sampling in (
        SamplingParams(temperature=1.0, seed=7, mirostat=1),
        SamplingParams(temperature=1.0, seed=7, mirostat=2, mirostat_tau=1.0),
        SamplingParams(temperature=1.0, seed=7, min_p=0.5, typical_p=0.5),
    ):
        assert text(sampling) == text(sampling)  # seeded: repeatable


def test_a_sampler_that_cannot_be_built_fails_its_request_alone(pool: Router, tiny: str) -> None:
    broken = SamplingParams(temperature=0, grammar="root ::= (")
    _, finished, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=4, sampling=broken))
    assert finished.reason == "error"
    assert "grammar" in str(finished.error)
    _, after, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=4))  # the model still serves
    assert (after.reason, after.completion_tokens) == ("length", 4)


def test_stop_strings_end_the_text_before_them(pool: Router, tiny: str) -> None:
    full, _, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=60))
    assert len(full) > 12
    stop = full[8:11]
    cut, finished, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=60, stop=(stop,)))
    assert cut == full[: full.index(stop)]
    assert (finished.reason, finished.stop_sequence) == ("stop", stop)
    _, ended, _ = asyncio.run(run(pool, tiny, "hello", max_tokens=2))
    assert ended.stop_sequence is None


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
    router = make_router(runtime, parallel=1)
    try:
        loaded, _ = acquire(router, long_context_model)

        async def abandon() -> None:
            stream = engine(router).stream_tokens(
                loaded, loaded.tokenize("x"), max_tokens=4000, sampling=GREEDY
            )
            async for event in stream:
                if isinstance(event, TextChunk):
                    break
            await stream.aclose()  # what a client disconnect does

        asyncio.run(abandon())
        engine(router).release(loaded)
        # With one sequence, a second request only runs if the first one's slot came back.
        _, finished, _ = asyncio.run(run(router, long_context_model, "y", max_tokens=5))
        assert finished.completion_tokens == 5
        deadline = time.monotonic() + 5
        while loaded.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loaded.batcher.active == 0
    finally:
        router.close()


def test_a_full_queue_answers_busy(runtime: Runtime, long_context_model: str) -> None:
    router = make_router(runtime, parallel=1, queue_size=1)
    try:
        loaded, _ = acquire(router, long_context_model)
        generating = threading.Event()

        def request(max_tokens: int) -> GenerationRequest:
            return GenerationRequest(
                prompt=loaded.tokenize("x"),
                max_tokens=max_tokens,
                sampling=GREEDY,
                emit=lambda event: generating.set() if isinstance(event, TextChunk) else None,
            )

        running = request(4000)
        loaded.batcher.submit(running)
        assert generating.wait(timeout=30)  # the first request holds the only sequence
        loaded.batcher.submit(request(1))  # waits in the queue
        with pytest.raises(EngineBusy, match="already waiting"):
            loaded.batcher.submit(request(1))
        running.cancelled.set()
        loaded.batcher.wake()
        engine(router).release(loaded)
    finally:
        router.close()


def test_a_prompt_longer_than_the_context_is_refused(pool: Router, tiny: str) -> None:
    loaded, _ = acquire(pool, tiny)
    try:
        with pytest.raises(PromptTooLong, match="context holds 256"):
            loaded.batcher.submit(
                GenerationRequest(prompt=[1] * 300, max_tokens=1, sampling=GREEDY, emit=lambda event: None)
            )
    finally:
        engine(pool).release(loaded)


def test_context_length_from_a_preference_capped_at_the_models(
    runtime: Runtime, pool: Router, long_context_model: str
) -> None:
    assert pool.load(long_context_model, keep_alive=0)[0].info.context_length == 4096
    runtime.store.set_preference("engine.context_length", 1024, actor="test")
    assert pool.load(long_context_model, keep_alive=0)[0].info.context_length == 1024
    runtime.store.set_preference("engine.context_length", 100_000, actor="test")
    assert pool.load(long_context_model, keep_alive=0)[0].info.context_length == 4096


def test_a_request_for_another_context_reloads_an_idle_model_only(
    pool: Router, long_context_model: str
) -> None:
    assert pool.load(long_context_model, keep_alive=-1, context_length=512)[0].info.context_length == 512
    same, reason = acquire(pool, long_context_model, context_length=512)
    assert reason == "the model was already loaded"
    # In use: a request for another context is served by the loaded model, not by a reload.
    busy, reason = acquire(pool, long_context_model, context_length=2048)
    assert busy is same
    assert busy.seq_ctx == 512
    engine(pool).release(busy, keep_alive=-1)
    engine(pool).release(same, keep_alive=-1)
    # Idle: reloaded, capped at the 4096 tokens the model was trained for.
    reloaded, reason = acquire(pool, long_context_model, context_length=100_000)
    assert reloaded is not same
    assert reloaded.seq_ctx == 4096
    assert reason == "reloaded with the requested context of 4096 tokens"
    engine(pool).release(reloaded, keep_alive=-1)
    # No request for a context: whatever is loaded serves.
    assert pool.load(long_context_model)[0].info.context_length == 4096
    assert [loaded.info.context_length for loaded in pool.loaded()] == [4096]


def test_idle_models_unload_after_keep_alive(pool: Router, tiny: str) -> None:
    pool.load(tiny, keep_alive=0.3)
    assert loaded_names(pool) == ["tiny:latest"]
    deadline = time.monotonic() + 5
    while pool.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.loaded() == []
    pool.load(tiny, keep_alive=-1)
    engine(pool)._reap()  # what the reaper does every half second
    assert loaded_names(pool) == ["tiny:latest"]  # a negative keep-alive keeps it
    assert pool.loaded()[0].info.expires_in is None


def test_keep_alive_zero_unloads_as_soon_as_the_request_ends(pool: Router, tiny: str) -> None:
    loaded, _ = acquire(pool, tiny)
    engine(pool).release(loaded, keep_alive=0)
    assert pool.loaded() == []


def test_unloading_when_idle_waits_for_the_request_in_flight(pool: Router, tiny: str) -> None:
    """Ollama's keep_alive 0 without a prompt, while another request runs on the model."""
    held, _ = acquire(pool, tiny)
    pool.unload_when_idle(tiny)
    assert loaded_names(pool) == ["tiny:latest"]  # serving: it stays until that request ends
    engine(pool).release(held, keep_alive=-1)
    assert pool.loaded() == []
    pool.unload_when_idle(tiny)  # not loaded: nothing to do, and nothing is loaded for it
    assert pool.loaded() == []


@pytest.fixture
def room_for_one(runtime: Runtime, tiny: str, tmp_path: Path, context: Context) -> Iterator[Router]:
    """Two models, "tiny" and "other", and a pool whose budget holds one of them."""
    runtime.models.import_file(write_llama_gguf(tmp_path / "other.gguf", seed=3), context, name="other")
    model = runtime.models.get(tiny)
    one = estimate_memory(model.capabilities, weights=model.size_bytes, n_ctx=256 * 4)
    router = make_router(runtime, parallel=4, memory_budget=int(one * 1.5))
    yield router
    router.close()


def test_a_second_model_past_the_budget_unloads_the_least_recently_used(room_for_one: Router) -> None:
    room_for_one.load("tiny")
    room_for_one.load("other")
    assert loaded_names(room_for_one) == ["other:latest"]


def test_a_model_in_use_is_never_unloaded_to_make_room(room_for_one: Router) -> None:
    held, _ = acquire(room_for_one, "tiny")
    with pytest.raises(InsufficientMemory, match="serving requests"):
        room_for_one.load("other")
    engine(room_for_one).release(held)


def test_a_model_larger_than_the_budget_is_refused(runtime: Runtime, tiny: str) -> None:
    model = runtime.models.get(tiny)
    too_small = make_router(runtime, memory_budget=model.size_bytes)
    try:
        with pytest.raises(InsufficientMemory, match="budget"):
            too_small.load(tiny)
    finally:
        too_small.close()


def test_only_gguf_models_are_loadable(
    runtime: Runtime, pool: Router, tmp_path: Path, context: Context
) -> None:
    from tests.models.test_service import write_safetensors

    runtime.models.import_file(write_safetensors(tmp_path / "m.safetensors"), context, name="st")
    with pytest.raises(ModelNotLoadable, match="no GGUF file"):
        pool.load("st")


def test_a_quarantined_model_is_never_loaded(
    runtime: Runtime, pool: Router, tiny: str, context: Context
) -> None:
    blob = runtime.cache.path(runtime.models.get(tiny).artifacts[0].digest)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    assert not runtime.models.verify(context)[0].ok
    with pytest.raises(ModelNotLoadable, match="quarantined"):
        pool.load(tiny)


def test_embeddings(pool: Router, tiny: str) -> None:
    _, spec = pool.resolve(tiny)
    result = asyncio.run(engine(pool).embed(spec, ["hello", "world"], keep_alive=None))
    assert [len(vector) for vector in result.vectors] == [64, 64]
    assert result.vectors[0] != result.vectors[1]
    assert result.tokens > 2
    assert result.reason == "loaded from the local cache on demand"


def test_a_removed_model_in_use_leaves_the_pool_at_once_and_unloads_when_released(
    room_for_one: Router, tiny: str, context: Context
) -> None:
    """Its memory still counts while it serves, so a model loaded meanwhile cannot overcommit."""
    pool = room_for_one
    loaded, _ = acquire(pool, tiny)
    assert pool.remove_model(tiny, context) > 0
    assert pool.loaded() == []  # no longer listed, nor offered to new requests
    with pytest.raises(InsufficientMemory):
        acquire(pool, "other")
    engine(pool).release(loaded)  # its last request ended: unloaded, its memory free
    other, _ = acquire(pool, "other")
    engine(pool).release(other)
    assert loaded_names(pool) == ["other:latest"]


def test_the_engine_loads_from_a_spec_without_a_registry(runtime: Runtime, tiny: str) -> None:
    """What a worker with a cache and no registry does: a digest and a path are enough."""
    model = runtime.models.get(tiny)
    artifact = model.artifacts[0]
    pool = EnginePool(EngineSettings(parallel=1))
    try:
        spec = LoadSpec(
            key="anything",
            digest=artifact.digest,
            path=runtime.cache.path(artifact.digest),
            size_bytes=artifact.size_bytes,
            context_length=128,
            capabilities=model.capabilities,
        )

        async def generate() -> list[object]:
            prompt = Prompt(text="hello", max_tokens=5, sampling=GREEDY)
            return [event async for event in pool.generate(spec, prompt)]

        events = asyncio.run(generate())
        assert isinstance(events[0], Ready)
        assert events[0].reason == "loaded from the local cache on demand"
        assert isinstance(events[-1], Finished)
        assert events[-1].completion_tokens == 5
        assert [info.key for info in pool.loaded()] == ["anything"]
    finally:
        pool.close()


def test_a_request_records_the_models_use(runtime: Runtime, pool: Router, tiny: str) -> None:
    """Last use orders the cache's LRU eviction: the router records it, the engine never does."""
    before = runtime.models.get(tiny).last_used_at
    pool.load(tiny)
    assert runtime.models.get(tiny).last_used_at > before


def test_a_thousand_requests_write_the_models_use_a_few_times(
    runtime: Runtime, pool: Router, tiny: str, data_dir: Path
) -> None:
    """A hot counter stays cool: last use still moves, but at most once a second per model."""
    db = apsw.Connection(str(data_dir / "appliance.db"))
    db.execute(
        "CREATE TABLE touches (n INTEGER); INSERT INTO touches VALUES (0);"
        " CREATE TRIGGER counted AFTER UPDATE OF last_used_at ON model_versions"
        " BEGIN UPDATE touches SET n = n + 1; END;"
    )
    started = time.monotonic()
    pool.route(tiny)
    first = runtime.models.get(tiny).last_used_at
    for _ in range(999):
        pool.route(tiny)
        time.sleep(0.0015)  # 1000 requests over about two seconds
    seconds = time.monotonic() - started
    assert runtime.models.get(tiny).last_used_at > first
    ((writes,),) = db.execute("SELECT n FROM touches")
    assert 2 <= writes <= seconds / TOUCH_EVERY + 1
