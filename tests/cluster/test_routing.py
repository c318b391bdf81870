"""The router with worker nodes: placement picks the engine, and the route records the node and why
(REQ-MODELS-0105, 0118). With no workers it serves exactly as before.

The workers' engines here are other in-process pools under another node name: the directory is the
router's seam (a protocol), and what these tests prove is the choice and its record, on real llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import Context
from appliance.cluster.placement import Candidate
from appliance.cluster.wire import encode_event
from appliance.engine.base import Engine, EngineEvent, Finished, Ready, TextChunk
from appliance.engine.pool import EnginePool
from appliance.engine.router import Router
from appliance.engine.service import GenerationOptions, InferenceService, Started
from appliance.errors import Conflict, ModelNotFound, NotReady
from appliance.runtime import Runtime
from appliance.settings import EngineSettings, Settings
from tests.cluster.conftest import Live, Worker

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


def make_router(
    runtime: Runtime, nodes: Directory | None, *, local: bool = True, **settings: object
) -> Router:
    engine_settings = EngineSettings(**settings)  # type: ignore[arg-type]
    return Router(
        engine_settings,
        runtime.models,
        store=runtime.store,
        cache=runtime.cache,
        preferences=runtime.preferences,
        engine=EnginePool(engine_settings),
        nodes=nodes,
        local=local,
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
            context=Context("test:user", "c1"),
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


def test_a_server_that_only_coordinates_sends_even_a_model_it_holds_to_a_worker(
    runtime: Runtime, tiny: str, directory: Directory, worker: EnginePool
) -> None:
    """cluster.local_inference false: the local engine is no candidate, though only it has the model."""
    router = make_router(runtime, directory, local=False)
    try:
        directory.workers = [worker_candidate(router, tiny)]
        directory.engines["n1"] = worker
        started, _ = chat(runtime, router, tiny)
    finally:
        router.close()
    assert started.route.node == "w1"
    assert started.route.reason.startswith("node w1 has memory free for the model")
    assert router.engine.loaded() == []


@pytest.mark.parametrize("workers", ["none", "draining"])
def test_a_server_that_only_coordinates_refuses_when_no_worker_can_serve(
    runtime: Runtime, tiny: str, directory: Directory, workers: str
) -> None:
    router = make_router(runtime, directory, local=False)
    try:
        if workers == "draining":
            directory.workers = [worker_candidate(router, tiny, loaded=True, state="draining")]
            match = r"^no node can serve the model sha256:\w+: w1 is draining$"
        else:
            match = r"this server only coordinates \(cluster.local_inference is false\)"
        with pytest.raises(NotReady, match=match):
            router.route(tiny)
        assert router.engine.loaded() == []
    finally:
        router.close()


def test_a_server_that_only_coordinates_refuses_to_load_into_its_own_engine(
    runtime: Runtime, tiny: str, directory: Directory
) -> None:
    router = make_router(runtime, directory, local=False)
    try:
        with pytest.raises(
            Conflict, match=r"^cannot load tiny:latest here: this server only coordinates"
        ) as e:
            router.load(tiny)
        assert e.value.hint == "load it onto a node with `appliance nodes load NODE tiny:latest`"
        with pytest.raises(ModelNotFound):
            router.load("ghost")
        assert router.unload(tiny) is False
        assert router.engine.loaded() == []
    finally:
        router.close()


def test_the_setting_reaches_the_servers_router(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, cluster={"local_inference": False})  # type: ignore[arg-type]
    assert Settings(data_dir=tmp_path).cluster.local_inference is True

    async def open_runtime() -> bool:
        runtime = Runtime.open(settings, with_engine=True)
        try:
            assert runtime.router is not None
            return runtime.router.local
        finally:
            runtime.close()

    assert asyncio.run(open_runtime()) is False


def test_loading_by_name_stays_on_the_local_engine(
    runtime: Runtime, tiny: str, router: Router, directory: Directory, worker: EnginePool
) -> None:
    directory.workers = [worker_candidate(router, tiny, loaded=True)]
    directory.engines["n1"] = worker
    loaded, route = router.load(tiny)
    assert (route.node, str(loaded.name)) == ("local", "tiny:latest")
    assert worker.loaded() == []


# -- through the server: a worker joined over HTTP, played by this test -----------------------------


def advertise(worker: Worker, digest: str, *, loaded: bool = True) -> None:
    """The worker's heartbeat: the model available (and loaded) there, 8 GiB of budget."""
    reply = worker.heartbeat(
        capabilities={"memory_budget": 8 * GIB},
        load={"active": 0, "queued": 0, "loaded": [digest] if loaded else []},
        models=[{"digest": digest, "model": "tiny:latest", "state": "available", "reason": None}],
    )
    assert reply.status_code == 200, reply.text


def answer_one(worker: Worker, events: list[EngineEvent], taken: list[dict[str, Any]]) -> threading.Thread:
    """A thread that takes the node's next work item over the long-poll and answers it with ``events``."""

    def run() -> None:
        with worker.client() as client:
            [item] = client.get("/api/v1/cluster/work?wait=20").json()["items"]
            taken.append(item)
            body = b"".join(json.dumps(encode_event(event)).encode() + b"\n" for event in events)
            headers = {"Content-Type": "application/x-ndjson"}
            client.post(f"/api/v1/cluster/work/{item['id']}/events", content=body, headers=headers)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_chat_reaches_the_worker_with_the_model_loaded_and_the_log_shows_node_and_reason(
    live_server: Any, tiny_gguf: Path
) -> None:
    """REQ-MODELS-0105, REQ-MODELS-0115, REQ-MODELS-0118, through the server's own API."""
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    assert live.runtime.router is not None
    digest = live.runtime.router.resolve("tiny")[1].digest
    worker = live.join("w1")
    advertise(worker, digest)
    taken: list[dict[str, Any]] = []
    answer: list[EngineEvent] = [
        Ready("the model was already loaded", 5, 1),
        TextChunk("hello from w1"),
        Finished("stop", 5, 3),
    ]
    answering = answer_one(worker, answer, taken)
    reply = live.client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    answering.join(timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "hello from w1"
    assert (taken[0]["kind"], taken[0]["spec"]["digest"]) == ("generate", digest)
    [record] = live.client.get("/api/v1/inference").json()
    assert (record["engine"], record["node"]) == ("worker:llama.cpp", "w1")
    assert record["reason"] == "node w1 has the model loaded; the model was already loaded"
    assert live.runtime.router.engine.loaded() == []


def test_a_worker_answer_that_breaks_off_is_an_error_to_the_client_and_in_the_log(
    live_server: Any, tiny_gguf: Path
) -> None:
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    assert live.runtime.router is not None
    worker = live.join("w1")
    advertise(worker, live.runtime.router.resolve("tiny")[1].digest)
    answer: list[EngineEvent] = [
        Ready("the model was already loaded", 5, 1),
        TextChunk("hello"),
    ]  # no finished
    answering = answer_one(worker, answer, [])
    reply = live.client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    answering.join(timeout=30)
    assert reply.status_code == 503, reply.text
    assert "answer ended before it finished" in reply.json()["error"]["message"]
    [record] = live.client.get("/api/v1/inference").json()
    assert (record["node"], record["outcome"], record["completion_tokens"]) == ("w1", "error", 0)


def test_a_drained_worker_gets_nothing_and_the_local_engine_serves(live_server: Any, tiny_gguf: Path) -> None:
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    assert live.runtime.router is not None
    worker = live.join("w1")
    advertise(worker, live.runtime.router.resolve("tiny")[1].digest)
    assert live.client.post("/api/v1/nodes/w1/drain").status_code == 200
    reply = live.client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert reply.status_code == 200, reply.text
    [record] = live.client.get("/api/v1/inference").json()
    assert record["node"] == "local"
    assert record["reason"].startswith("node local has the model cached; it loads it first; ")


def test_a_ready_worker_with_a_model_available_is_an_inference_path(live_server: Any) -> None:
    """REQ-MODELS-0114: /readyz counts a worker that can answer."""
    live: Live = live_server()
    assert live.client.get("/readyz").status_code == 503  # no model here, no worker
    advertise(live.join("w1"), "sha256:" + "c" * 64, loaded=False)
    deadline = time.monotonic() + 10  # routing reads the nodes at most once a second
    while (ready := live.client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.2)
    assert ready.json()["reasons"] == []


def test_a_worker_only_loading_its_model_is_no_inference_path(live_server: Any) -> None:
    live: Live = live_server()
    reply = live.join("w1").heartbeat(
        models=[{"digest": "sha256:" + "c" * 64, "model": "tiny:latest", "state": "loading", "reason": None}]
    )
    assert reply.status_code == 200
    time.sleep(1.1)  # past the directory's snapshot
    assert live.client.get("/readyz").status_code == 503


def test_the_directory_counts_the_work_in_flight_on_each_node(live_server: Any) -> None:
    live: Live = live_server()
    worker = live.join("w1")
    advertise(worker, "sha256:" + "c" * 64)
    nodes = live.runtime.nodes
    assert nodes is not None

    async def submit_two() -> None:
        live.channel.submit(worker.node_id, {"kind": "generate"})
        live.channel.submit(worker.node_id, {"kind": "generate"})

    live.call(submit_two())
    [candidate] = nodes.candidates("sha256:" + "c" * 64)  # from this thread, as from any but the loop's
    assert (candidate.name, candidate.state, candidate.load) == ("w1", "ready", 2)
    assert candidate.loaded == candidate.cached == frozenset({"sha256:" + "c" * 64})
    assert (candidate.memory_budget, candidate.memory_free) == (8 * GIB, 8 * GIB)  # not in its config
    remote = nodes.engine(candidate)
    assert (remote.name, remote.node, remote.memory_budget) == ("worker:llama.cpp", "w1", 8 * GIB)


def test_a_prompt_task_is_routed_to_the_worker_too(live_server: Any, tiny_gguf: Path) -> None:
    """The task queue runs on its own event loop: the answer is relayed from the channel's."""
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    assert live.runtime.router is not None
    worker = live.join("w1")
    advertise(worker, live.runtime.router.resolve("tiny")[1].digest)
    taken: list[dict[str, Any]] = []
    answer = [Ready("the model was already loaded", 5, 1), TextChunk("a task answer"), Finished("stop", 5, 3)]
    answering = answer_one(worker, answer, taken)
    created = live.client.post("/api/v1/tasks", json={"model": "tiny", "text": "hi"})
    assert created.status_code in (200, 201, 202), created.text
    answering.join(timeout=30)
    assert [item["kind"] for item in taken] == ["generate"]
    deadline = time.monotonic() + 30
    while not (records := live.client.get("/api/v1/inference").json()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert (records[0]["node"], records[0]["engine"]) == ("w1", "worker:llama.cpp")
