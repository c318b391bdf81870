"""The agent's loops against the server's half of the node routes, played by the test.

The server side is an httpx transport that answers the contract's routes (heartbeat,
work long-poll, the streamed events); blobs come from a real file server on loopback with Range
support, and the engine is the worker's real EnginePool on the tiny model. The same loops
against a real ``appliance serve`` are in test_agent_e2e.py.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.cluster.agent import Agent, Backoff, WorkerConfig
from appliance.cluster.wire import decode_embeddings, decode_event, encode_prompt, encode_spec
from appliance.engine.base import Finished, LoadSpec, Prompt, Ready, SamplingParams, TextChunk
from appliance.engine.pool import EnginePool
from appliance.errors import Unauthorized
from appliance.settings import EngineSettings, Settings
from tests.fileserver import Faults, FileServer, serve_files
from tests.tiny_model import write_llama_gguf

CREDENTIAL = "apnode_" + "c" * 43
V1, V2 = "01JF0000000000000000000001", "01JF0000000000000000000002"


class Transport(httpx.AsyncBaseTransport):
    """Hands each request to the test's server as it is sent: unlike httpx.MockTransport, which
    reads a request body whole first, a streamed body arrives line by line."""

    def __init__(self, handler: Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]) -> None:
        self.handler = handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.handler(request)


@dataclass
class Line:
    at: float
    data: dict[str, Any]


@dataclass
class Cluster:
    """The server's side of the node routes, as the contract draws them."""

    config_version: str = V1
    config: dict[str, Any] = field(default_factory=lambda: {"models": []})
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    items: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    events: dict[str, list[Line]] = field(default_factory=dict)
    ended: dict[str, asyncio.Event] = field(default_factory=dict)
    poll_statuses: list[int] = field(default_factory=list)  # answered (and consumed) before work
    polls: list[float] = field(default_factory=list)
    poll_answers: list[httpx.Response] = field(default_factory=list)  # then these, before work
    on_line: Any = None  # called with (work id, line) as each line arrives
    tasks: list[dict[str, Any]] = field(default_factory=list)  # handed out (and consumed) by claims
    task_calls: list[tuple[str, str | None]] = field(default_factory=list)  # (route, ?attempt)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {CREDENTIAL}"
        path = request.url.path
        if path == "/api/v1/cluster/heartbeat":
            body = json.loads(await request.aread())
            self.heartbeats.append(body)
            changed = body["config_applied"] != self.config_version
            return httpx.Response(
                200,
                json={
                    "config_version": self.config_version,
                    "config": self.config if changed else None,
                    "drained": False,
                    "heartbeat_interval": 0.2,
                },
            )
        if path == "/api/v1/cluster/work":
            self.polls.append(time.monotonic())
            if self.poll_statuses:
                status = self.poll_statuses.pop(0)
                return httpx.Response(status, json={"status": status, "detail": f"answered {status}"})
            if self.poll_answers:
                return self.poll_answers.pop(0)
            try:
                items = [await asyncio.wait_for(self.items.get(), 0.3)]
            except TimeoutError:
                return httpx.Response(200, json={"items": []})
            while not self.items.empty():
                items.append(self.items.get_nowait())
            return httpx.Response(200, json={"items": items})
        if path.startswith("/api/v1/cluster/tasks/"):
            return await self.task_route(request, path.rsplit("/", 1)[1])
        if path.endswith("/events"):
            work_id = path.split("/")[-2]
            assert request.headers["content-type"] == "application/x-ndjson"
            lines = self.events.setdefault(work_id, [])
            buffer = b""
            async for chunk in request.stream:  # type: ignore[union-attr]
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    line = Line(time.monotonic(), json.loads(raw))
                    lines.append(line)
                    if self.on_line is not None:
                        self.on_line(work_id, line)
            self.ended.setdefault(work_id, asyncio.Event()).set()
            return httpx.Response(200, json={"state": "done"})
        return httpx.Response(404, json={"status": 404, "detail": f"no route {path}"})

    async def task_route(self, request: httpx.Request, route: str) -> httpx.Response:
        """The task routes of a worker's runner: claim hands out ``tasks``; the rest are recorded."""
        await request.aread()  # the output's streamed body whole: its lines are not looked at here
        if route == "claim":
            return httpx.Response(200, json={"task": self.tasks.pop(0) if self.tasks else None})
        self.task_calls.append((route, request.url.params.get("attempt")))
        if route == "finish":
            self.finished.set()
            return httpx.Response(200, json={"state": "succeeded", "duplicate": False})
        return httpx.Response(200, json={"lines": 1, "lease_expires_at": "2099-01-01T00:00:00.000000Z"})

    async def answer(self, work_id: str) -> list[dict[str, Any]]:
        await asyncio.wait_for(self.ended.setdefault(work_id, asyncio.Event()).wait(), 60)
        return [line.data for line in self.events[work_id]]


@pytest.fixture
def files() -> Iterator[FileServer]:
    with serve_files() as server:
        server.require_authorization = (f"Bearer {CREDENTIAL}", "Bearer", set())
        yield server


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A data dir the sandbox's jobs can reach (as root they run as nobody; tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="appliance-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Model:
    digest: str
    content: bytes
    spec: LoadSpec


def tiny(tmp_path: Path, *, context: int = 256, seed: int = 0) -> Model:
    path = write_llama_gguf(tmp_path / f"tiny-{context}-{seed}.gguf", context=context, seed=seed)
    content = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    spec = LoadSpec(
        key="tiny:latest", digest=digest, path=path, size_bytes=len(content), context_length=context
    )
    return Model(digest, content, spec)


def entry(model: Model) -> dict[str, Any]:
    return {
        "model": model.spec.key,
        "digest": model.digest,
        "size_bytes": len(model.content),
        "spec": encode_spec(model.spec),
    }


@asynccontextmanager
async def running(
    cluster: Cluster, files: FileServer, data_dir: Path
) -> AsyncIterator[tuple[Agent, list[str]]]:
    logged: list[str] = []
    config = WorkerConfig(server=files.url, node_id="n1", name="w1", credential=CREDENTIAL)
    pool = EnginePool(EngineSettings(parallel=2))
    agent = Agent(
        config,
        Settings(data_dir=data_dir),
        log=logged.append,
        pool=pool,
        heartbeat_interval=0.2,
        transport=Transport(cluster.handle),
    )
    task = asyncio.create_task(agent.run())
    try:
        yield agent, logged
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
        pool.close()


async def until(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def states(cluster: Cluster, digest: str) -> list[str]:
    """The states the heartbeats reported for ``digest``, repeats dropped."""
    seen: list[str] = []
    for beat in cluster.heartbeats:
        for model in beat["models"]:
            if model["digest"] == digest and (not seen or seen[-1] != model["state"]):
                seen.append(model["state"])
    return seen


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test on a fresh event loop (its fixtures stay those of the sync signature)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def test_backoff_doubles_from_half_a_second_to_ten_and_resets() -> None:
    backoff = Backoff()
    assert [backoff.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next() == 0.5


@in_loop
async def test_config_is_fetched_loaded_reported_and_acked_then_unloaded(
    files: FileServer, tmp_path: Path
) -> None:
    model = tiny(tmp_path)
    files.add(f"/api/v1/blobs/{model.digest}", model.content, Faults(etag=f'"{model.digest}"'))
    cluster = Cluster(config={"models": [entry(model)]})
    data_dir = tmp_path / "worker"
    async with running(cluster, files, data_dir) as (agent, logged):
        await until(lambda: cluster.heartbeats and cluster.heartbeats[-1]["config_applied"] == V1)
        assert states(cluster, model.digest) == ["loading", "available"]
        last = cluster.heartbeats[-1]
        assert last["load"]["loaded"] == [model.digest]
        assert (
            data_dir / "blobs" / "sha256" / model.digest.removeprefix("sha256:")
        ).read_bytes() == model.content
        # capabilities go with the first heartbeat, then only when they change
        assert cluster.heartbeats[0]["capabilities"]["memory_budget"] == agent.pool.memory_budget
        assert {"cpu", "memory", "gpus", "disk_free_bytes", "engine", "version"} <= set(
            cluster.heartbeats[0]["capabilities"]
        )
        assert all(beat["capabilities"] is None for beat in cluster.heartbeats[1:])
        sent = len(cluster.heartbeats)
        agent.pool.budget //= 2  # a capability that changed goes with the next heartbeat
        await until(lambda: any(beat["capabilities"] for beat in cluster.heartbeats[sent:]))
        changed = next(beat["capabilities"] for beat in cluster.heartbeats[sent:] if beat["capabilities"])
        assert changed["memory_budget"] == agent.pool.budget
        assert "loading tiny:latest" in logged
        assert "tiny:latest available" in logged
        await until(lambda: f"connected to {files.url} as w1" in logged)  # the first poll's answer

        cluster.config_version, cluster.config = V2, {"models": []}
        await cluster.items.put({"id": "w-config", "kind": "config"})
        await until(lambda: cluster.heartbeats[-1]["config_applied"] == V2)
        await until(lambda: cluster.heartbeats[-1]["load"]["loaded"] == [])
        models = cluster.heartbeats[-1]["models"]
        assert models == [{"digest": model.digest, "model": "tiny:latest", "state": "cached", "reason": None}]
    assert len(files.body_requests(f"/api/v1/blobs/{model.digest}")) == 1


@in_loop
async def test_a_blob_that_does_not_verify_is_reported_failed(files: FileServer, tmp_path: Path) -> None:
    model = tiny(tmp_path)
    files.add(f"/api/v1/blobs/{model.digest}", model.content, Faults(corrupt=True))
    cluster = Cluster(config={"models": [entry(model)]})
    async with running(cluster, files, tmp_path / "worker") as (agent, _):
        await until(lambda: cluster.heartbeats and cluster.heartbeats[-1]["config_applied"] == V1)
        [reported] = cluster.heartbeats[-1]["models"]
        assert reported["state"] == "failed"
        assert "they were discarded" in reported["reason"]
        assert agent.cache.blob_files() == {}


@in_loop
async def test_generate_and_embed_run_on_the_workers_engine_several_at_once(
    files: FileServer, tmp_path: Path
) -> None:
    model = tiny(tmp_path)
    files.add(f"/api/v1/blobs/{model.digest}", model.content)
    cluster = Cluster()
    prompt = Prompt(text="hello", max_tokens=40, sampling=SamplingParams(temperature=0.0))
    async with running(cluster, files, tmp_path / "worker"):
        # not in the config: the blob is fetched for the work item itself
        item = {
            "id": "w1",
            "kind": "generate",
            "spec": encode_spec(model.spec),
            "prompt": encode_prompt(prompt),
            "lease_seconds": 30,
        }
        cluster.items.put_nowait(item)
        cluster.items.put_nowait({**item, "id": "w1b"})  # in the same poll: both run at once
        for work_id in ("w1", "w1b"):
            events = [decode_event(line) for line in await cluster.answer(work_id)]
            assert isinstance(events[0], Ready)
            assert isinstance(events[-1], Finished)
            assert events[-1].reason == "length"
            assert events[-1].completion_tokens == 40
            assert any(isinstance(event, TextChunk) for event in events[1:-1])
        assert len(files.body_requests(f"/api/v1/blobs/{model.digest}")) == 1  # one fetch for both

        embed = {
            "id": "w2",
            "kind": "embed",
            "spec": encode_spec(model.spec),
            "texts": ["a", "bc"],
            "keep_alive": None,
            "truncate": False,
            "lease_seconds": 30,
        }
        await cluster.items.put(embed)
        [line] = await cluster.answer("w2")
        result = decode_embeddings(line)
        assert len(result.vectors) == 2
        assert len(result.vectors[0]) == 64

        too_long = {**item, "id": "w3", "prompt": encode_prompt(Prompt(text="x" * 2000))}
        await cluster.items.put(too_long)
        ready, last = await cluster.answer("w3")  # the engine's own error, after its Ready
        assert ready["type"] == "ready"
        finished = decode_event(last)
        assert isinstance(finished, Finished)
        assert finished.reason == "error"
        assert finished.error is not None
        assert finished.error.code == "prompt_too_long"

        broken = {"id": "w4", "kind": "generate", "spec": {"digest": "sha256:" + "0" * 64}, "prompt": {}}
        await cluster.items.put(broken)
        [line] = await cluster.answer("w4")
        assert line["type"] == "finished"
        assert line["error"]["code"] in ("remote_not_found", "engine_failure", "invalid_input")


@in_loop
async def test_a_cancel_item_ends_the_generation_with_a_cancelled_line(
    files: FileServer, tmp_path: Path
) -> None:
    model = tiny(tmp_path, context=8192)  # long enough to be cut off mid-way
    files.add(f"/api/v1/blobs/{model.digest}", model.content)
    cluster = Cluster()

    def cancel_on_first_text(work_id: str, line: Line) -> None:
        if line.data["type"] == "text" and len(cluster.events[work_id]) == 2:
            cluster.items.put_nowait({"id": "w-cancel", "kind": "cancel", "work": work_id})

    cluster.on_line = cancel_on_first_text
    prompt = Prompt(text="hello", sampling=SamplingParams(temperature=0.0))  # runs to the context's end
    async with running(cluster, files, tmp_path / "worker"):
        await cluster.items.put(
            {"id": "w1", "kind": "generate", "spec": encode_spec(model.spec), "prompt": encode_prompt(prompt)}
        )
        lines = await cluster.answer("w1")
        assert lines[-1]["type"] == "finished"
        assert lines[-1]["reason"] == "cancelled"
        assert len(lines) < 1000  # cut off: the lines reached the server while they were made
        await until(lambda: cluster.heartbeats[-1]["load"]["active"] == 0)


@in_loop
async def test_a_revoked_credential_stops_the_agent_with_that_message(
    files: FileServer, tmp_path: Path
) -> None:
    cluster = Cluster(poll_statuses=[401])
    agent = Agent(
        WorkerConfig(server=files.url, node_id="n1", name="w1", credential=CREDENTIAL),
        Settings(data_dir=tmp_path / "worker"),
        log=lambda line: None,
        transport=Transport(cluster.handle),
    )
    with pytest.raises(Unauthorized, match="no longer accepts this node's credential") as caught:
        await asyncio.wait_for(agent.run(), 30)
    assert "worker.json" in caught.value.hint


@in_loop
async def test_a_lost_connection_is_retried_with_backoff_and_said_once(
    files: FileServer, tmp_path: Path
) -> None:
    cluster = Cluster(poll_statuses=[503, 502, 503])
    async with running(cluster, files, tmp_path / "worker") as (_, logged):
        await until(lambda: len(cluster.polls) >= 5)
    gaps = [later - earlier for earlier, later in zip(cluster.polls, cluster.polls[1:4], strict=False)]
    for gap, expected in zip(gaps, [0.5, 1.0, 2.0], strict=True):
        assert expected <= gap < expected + 0.5
    lost = [line for line in logged if "retrying in" in line]
    assert len(lost) == 1
    assert lost[0].endswith("retrying in 0.5 s")
    assert logged[-1] == f"connected to {files.url} as w1"


@in_loop
async def test_a_malformed_config_is_not_acked_and_a_newer_one_is_applied(
    files: FileServer, tmp_path: Path
) -> None:
    cluster = Cluster(config={"models": [{"model": "x"}]})  # no digest
    async with running(cluster, files, tmp_path / "worker") as (_, logged):
        await until(lambda: any("not applied: it is malformed" in line for line in logged))
        await until(lambda: len(cluster.heartbeats) >= 4)
        assert all(beat["config_applied"] is None for beat in cluster.heartbeats)
        assert sum("not applied" in line for line in logged) == 1  # not retried on every heartbeat
        cluster.config_version, cluster.config = V2, {"models": []}
        await until(lambda: cluster.heartbeats[-1]["config_applied"] == V2)


@in_loop
async def test_an_answer_that_is_not_a_json_object_is_retried_like_a_lost_connection(
    files: FileServer, tmp_path: Path
) -> None:
    cluster = Cluster(
        poll_answers=[httpx.Response(200, text="<html>a proxy</html>"), httpx.Response(200, json=[1])]
    )
    async with running(cluster, files, tmp_path / "worker") as (_, logged):
        await until(lambda: f"connected to {files.url} as w1" in logged)
    [retrying] = [line for line in logged if "retrying in" in line]
    assert "answered with no JSON" in retrying
    assert len(cluster.polls) >= 3


@in_loop
async def test_a_running_task_counts_in_the_heartbeats_load_and_its_calls_name_its_attempt(
    files: FileServer, reachable_dir: Path
) -> None:
    cluster = Cluster()
    cluster.tasks.append(
        {
            "id": "t1",
            "mode": "script",
            "text": "echo hi; sleep 2",
            "limits": {"timeout_seconds": 30},
            "inference": False,
            "attachments": [],
            "lease_seconds": 0.6,  # renewed every 0.2 s
            "attempt": 3,
        }
    )
    async with running(cluster, files, reachable_dir / "worker") as (agent, _):
        await until(lambda: cluster.heartbeats and cluster.heartbeats[-1]["load"]["active"] == 1)
        assert agent.tasks is not None
        assert agent.tasks.running == 1
        await asyncio.wait_for(cluster.finished.wait(), 60)
        await until(lambda: cluster.heartbeats[-1]["load"]["active"] == 0)
    routes = {route for route, _ in cluster.task_calls}
    assert routes == {"output", "renew", "finish"}, cluster.task_calls
    assert {attempt for _, attempt in cluster.task_calls} == {"3"}
