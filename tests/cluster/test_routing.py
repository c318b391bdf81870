"""The router with worker nodes: placement picks the engine, and the route records the node and why
(REQ-MODELS-0105, 0118). With no workers it serves exactly as before.

The workers' engines here are other in-process pools under another node name: the directory is the
router's seam (a protocol), and what these tests prove is the choice and its record, on real llama.cpp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.cluster.placement import Candidate
from appliance.engine.base import Engine, Finished
from appliance.engine.pool import EnginePool
from appliance.engine.router import Router
from appliance.engine.service import GenerationOptions, InferenceService, Started
from appliance.errors import NotReady
from appliance.runtime import Runtime
from appliance.settings import EngineSettings

GIB = 1 << 30


class Directory:
    """Workers as a test lays them out: candidates, and each one's engine by node id."""

    def __init__(self) -> None:
        self.workers: list[Candidate] = []
        self.engines: dict[str, Engine] = {}

    def candidates(self, digest: str) -> list[Candidate]:
        return list(self.workers)

    def engine(self, candidate: Candidate) -> Engine:
        return self.engines[candidate.id]


@pytest.fixture
def tiny(runtime: Runtime, tiny_gguf: Path, context: Context) -> str:
    runtime.models.import_file(tiny_gguf, context, name="tiny")
    return "tiny"


@pytest.fixture
def directory() -> Directory:
    return Directory()


@pytest.fixture
def worker() -> Iterator[EnginePool]:
    pool = EnginePool(EngineSettings())
    pool.node = "w1"
    yield pool
    pool.close()


def make_router(runtime: Runtime, nodes: Directory | None, **settings: object) -> Router:
    engine_settings = EngineSettings(**settings)  # type: ignore[arg-type]
    return Router(
        engine_settings,
        runtime.models,
        store=runtime.store,
        cache=runtime.cache,
        preferences=runtime.preferences,
        engine=EnginePool(engine_settings),
        nodes=nodes,
    )


@pytest.fixture
def router(runtime: Runtime, directory: Directory) -> Iterator[Router]:
    opened = make_router(runtime, directory)
    yield opened
    opened.close()


def chat(runtime: Runtime, router: Router, model: str) -> tuple[Started, Finished]:
    inference = InferenceService(router, runtime.store, runtime.metrics)

    async def run() -> tuple[Started, Finished]:
        started: Started | None = None
        finished: Finished | None = None
        stream = inference.chat(
            model,
            [{"role": "user", "content": "hi"}],
            GenerationOptions(max_tokens=4, temperature=0),
            endpoint="test",
            correlation_id="c1",
        )
        async for event in stream:
            if isinstance(event, Started):
                started = event
            elif isinstance(event, Finished):
                finished = event
        assert started is not None
        assert finished is not None
        return started, finished

    return asyncio.run(asyncio.wait_for(run(), timeout=60))


def worker_candidate(router: Router, model: str, **fields: object) -> Candidate:
    _, spec = router.resolve(model)
    values: dict[str, object] = {"memory_budget": 8 * GIB, "memory_free": 8 * GIB, **fields}
    for key in ("loaded", "cached"):
        if values.get(key) is True:
            values[key] = frozenset({spec.digest})
    return Candidate(id="n1", name="w1", **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("nodes", [None, Directory()], ids=["no-directory", "no-workers"])
def test_with_no_workers_the_local_engine_serves_as_before(
    runtime: Runtime, tiny: str, nodes: Directory | None
) -> None:
    router = make_router(runtime, nodes)
    try:
        routed = router.route(tiny)
        assert routed.engine is router.engine
        assert routed.placement is None
        started, finished = chat(runtime, router, tiny)
    finally:
        router.close()
    assert (started.route.engine, started.route.node) == ("local:llama.cpp", "local")
    assert started.route.reason == "loaded from the local cache on demand"
    assert finished.reason in {"stop", "length"}
    [record] = runtime.store.list_inference()
    assert (record.node, record.reason) == ("local", "loaded from the local cache on demand")


def test_a_worker_with_the_model_loaded_serves_it_and_the_log_says_why(
    runtime: Runtime, tiny: str, router: Router, directory: Directory, worker: EnginePool
) -> None:
    """REQ-MODELS-0105, REQ-MODELS-0118: the node and the placement's reason are recorded."""
    directory.workers = [worker_candidate(router, tiny, loaded=True)]
    directory.engines["n1"] = worker
    worker.load(router.resolve(tiny)[1], keep_alive=-1)
    started, _ = chat(runtime, router, tiny)
    reason = "node w1 has the model loaded; the model was already loaded"
    assert (started.route.node, started.route.reason) == ("w1", reason)
    [record] = runtime.store.list_inference()
    assert (record.node, record.reason) == ("w1", reason)
    assert router.engine.loaded() == []  # the local engine never loaded it


def test_a_local_copy_beats_a_worker_that_must_fetch_the_model(
    runtime: Runtime, tiny: str, router: Router, directory: Directory, worker: EnginePool
) -> None:
    directory.workers = [worker_candidate(router, tiny)]
    directory.engines["n1"] = worker
    started, _ = chat(runtime, router, tiny)
    assert started.route.node == "local"
    assert started.route.reason == (
        "node local has the model cached; it loads it first; loaded from the local cache on demand"
    )
    assert worker.loaded() == []


@pytest.mark.parametrize("state", ["draining", "unavailable"])
def test_a_node_that_is_not_ready_is_passed_over(
    runtime: Runtime, tiny: str, router: Router, directory: Directory, worker: EnginePool, state: str
) -> None:
    directory.workers = [worker_candidate(router, tiny, loaded=True, state=state)]
    directory.engines["n1"] = worker
    assert router.route(tiny).engine is router.engine


def test_with_no_node_that_fits_the_request_is_refused_naming_each(
    runtime: Runtime, tiny: str, directory: Directory
) -> None:
    router = make_router(runtime, directory, memory_budget=1024)
    try:
        directory.workers = [worker_candidate(router, tiny, loaded=True, state="draining")]
        with pytest.raises(NotReady, match=r"local cannot hold it: .*; w1 is draining"):
            router.route(tiny)
    finally:
        router.close()


def test_loading_by_name_stays_on_the_local_engine(
    runtime: Runtime, tiny: str, router: Router, directory: Directory, worker: EnginePool
) -> None:
    directory.workers = [worker_candidate(router, tiny, loaded=True)]
    directory.engines["n1"] = worker
    loaded, route = router.load(tiny)
    assert (route.node, str(loaded.name)) == ("local", "tiny:latest")
    assert worker.loaded() == []
