"""A real worker process against a real server: join, heartbeats, a model loaded through the server
(its bytes from the server's cache), work streamed back, and a restart that keeps the cache.

The worker is ``appliance worker join`` / ``worker run`` in its own process and data dir, and
listens on no port. The first test's server is ``appliance serve`` in its own process. Routing
(``/v1`` to a node) is not part of this branch, so the second test, which sends work, runs the
server's app in this process (the cluster conftest's ``live_server``) and submits work through
its channel (``WorkChannel.submit`` / ``cancel``), as the router's remote engine will.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from appliance.cluster.wire import encode_prompt
from appliance.engine.base import Prompt, SamplingParams
from tests.cluster.conftest import Live
from tests.conftest import APPLIANCE, Server, free_port, import_file
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf

T = TypeVar("T")


class WorkerProcess:
    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*APPLIANCE, "worker", *args, "--data-dir", str(data_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


@pytest.fixture
def short_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server started after this holds a worker's work poll open 1 s, not 25: a worker says it
    connected when its first poll is answered, which the tests wait for."""
    monkeypatch.setenv("APPLIANCE_CLUSTER__WORK_WAIT", "1s")


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(data_dir: Path, *args: str) -> WorkerProcess:
        worker = WorkerProcess(data_dir, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(condition: Callable[[], T | None], what: str, worker: WorkerProcess, timeout: float = 90) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen (worker exit {worker.process.poll()})\n{worker.log}")
        time.sleep(0.1)


def node_named(client: httpx.Client, name: str) -> dict[str, Any] | None:
    nodes = client.get("/api/v1/nodes").json()
    return next((node for node in nodes if node["name"] == name), None)


def model_state(node: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    if node is None:
        return None
    return next((item for item in node["models"] if item["model"] == model), None)


def listening_sockets(pid: int) -> set[int]:
    """Inodes of the TCP sockets the process holds that are listening."""
    listening: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A":  # LISTEN
                    listening.add(int(fields[9]))
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[8:-1]))
    return held & listening


def test_a_worker_joins_loads_a_model_from_the_server_and_keeps_it_over_a_restart(
    short_polls: None,
    server: Server,
    data_dir: Path,
    tiny_gguf: Path,
    tmp_path: Path,
    workers: Callable[..., WorkerProcess],
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    token = server.client.post("/api/v1/nodes/tokens", json={"expires": "1h"}).json()["token"]
    worker_dir = tmp_path / "worker"
    worker = workers(worker_dir, "join", server.url, "--token", token, "--name", "w1")

    node = wait_for(lambda: node_named(server.client, "w1"), "the node in GET /api/v1/nodes", worker)
    node = wait_for(
        lambda: (n := node_named(server.client, "w1")) and n["last_heartbeat_at"] and n, "a heartbeat", worker
    )
    assert node["state"] == "ready"
    assert node["capabilities"]["memory_budget"] > 0
    assert "version" in node["capabilities"]
    assert listening_sockets(worker.process.pid) == set()

    answer = server.client.post(f"/api/v1/nodes/{node['id']}/models", json={"model": "tiny"})
    assert answer.status_code == 202, answer.text
    version = answer.json()["config_version"]
    node = wait_for(
        lambda: (n := node_named(server.client, "w1")) and n["config_applied"] == version and n,
        "the config applied",
        worker,
    )
    reported = model_state(node, "tiny:latest")
    assert reported is not None
    assert reported["state"] == "available", reported
    digest = reported["digest"]
    assert node["load"]["loaded"] == [digest]
    blob = worker_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert blob.read_bytes() == tiny_gguf.read_bytes()
    assert "loading tiny:latest" in worker.log
    assert "tiny:latest available" in worker.log
    assert oct(os.stat(worker_dir / "worker.json").st_mode & 0o777) == "0o600"

    assert worker.stop() == 0
    assert "stopped" in worker.log
    inode = blob.stat().st_ino

    again = workers(worker_dir, "run")
    wait_for(lambda: "connected to" in again.log, "the restarted worker connected", again)
    node = wait_for(
        lambda: (
            (n := node_named(server.client, "w1"))
            and (m := model_state(n, "tiny:latest"))
            and m["state"] == "available"
            and n["load"]["loaded"] == [digest]
            and n
        ),
        "the model available again",
        again,
    )
    assert len(server.client.get("/api/v1/nodes").json()) == 1  # the same node, not a second join
    assert blob.stat().st_ino == inode
    assert "fetching" not in again.log  # loaded from its own cache

    removed = server.client.delete(f"/api/v1/nodes/{node['id']}")
    assert removed.status_code == 200
    assert again.process.wait(timeout=60) == 1
    assert "no longer accepts this node's credential" in again.log


def test_work_sent_through_the_servers_channel_streams_back_from_the_worker_process(
    live_server: Any, data_dir: Path, tmp_path: Path, workers: Callable[..., WorkerProcess]
) -> None:
    # a long context, so that a generation runs long enough to be cancelled mid-way
    import_file(
        data_dir,
        write_llama_gguf(tmp_path / "long.gguf", context=8192, chat_template=TINY_CHAT_TEMPLATE),
        "tiny",
    )
    live: Live = live_server()
    worker = workers(tmp_path / "worker", "join", live.url, "--token", live.token(), "--name", "w2")
    node = wait_for(lambda: node_named(live.client, "w2"), "the node", worker)
    assigned = live.client.post(f"/api/v1/nodes/{node['id']}/models", json={"model": "tiny"}).json()
    wait_for(
        lambda: (
            (m := model_state(node_named(live.client, "w2"), "tiny:latest")) and m["state"] == "available"
        ),
        "the model available",
        worker,
    )
    [entry] = assigned["config"]["models"]
    prompt = Prompt(text="hello", max_tokens=30, sampling=SamplingParams(temperature=0.0))

    async def generate() -> list[tuple[float, dict[str, Any]]]:
        work = live.channel.submit(
            node["id"], {"kind": "generate", "spec": entry["spec"], "prompt": encode_prompt(prompt)}
        )
        return [(time.monotonic(), event) async for event in work.events()]

    events = live.call(generate(), timeout=60)
    kinds = [event["type"] for _, event in events]
    assert kinds[0] == "ready"
    assert kinds[-1] == "finished"
    assert set(kinds[1:-1]) == {"text"}
    assert events[-1][1]["completion_tokens"] == 30
    assert events[-1][1]["error"] is None

    async def cancel_mid_way() -> list[dict[str, Any]]:
        long = Prompt(text="hello", sampling=SamplingParams(temperature=0.0), max_tokens=100_000)
        work = live.channel.submit(
            node["id"], {"kind": "generate", "spec": {**entry["spec"]}, "prompt": encode_prompt(long)}
        )
        seen = []
        async for event in work.events():
            seen.append(event)
            if event["type"] == "text":
                live.channel.cancel(work.id)  # the client went away
        return seen

    seen = live.call(cancel_mid_way(), timeout=60)
    assert seen[-1]["type"] == "text"  # the client's stream ends at once
    wait_for(lambda: node_named(live.client, "w2")["load"]["active"] == 0, "the generation closed", worker)
    wait_for(lambda: "the client went away" in worker.log or "did not reach" in worker.log, "its end", worker)

    async def embed() -> list[dict[str, Any]]:
        work = live.channel.submit(
            node["id"],
            {
                "kind": "embed",
                "spec": entry["spec"],
                "texts": ["a", "b"],
                "keep_alive": None,
                "truncate": False,
            },
        )
        return [event async for event in work.events()]

    [embeddings] = live.call(embed(), timeout=60)
    assert embeddings["type"] == "embeddings"
    assert len(embeddings["vectors"]) == 2


class ServeProcess:
    """``appliance serve`` over HTTPS (the certificate of ``tls init``) on a given port."""

    def __init__(self, data_dir: Path, port: int, ca_file: Path) -> None:
        self.url = f"https://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = httpx.Client(
            base_url=self.url, verify=ssl.create_default_context(cafile=ca_file), timeout=30
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, "appliance serve exited"
            assert time.monotonic() < deadline, "appliance serve did not get ready"
            time.sleep(0.2)

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_a_worker_pins_the_servers_ca_from_the_token_and_rides_out_a_server_restart(
    short_polls: None,
    cli: Any,
    data_dir: Path,
    tiny_gguf: Path,
    tmp_path: Path,
    workers: Callable[..., WorkerProcess],
) -> None:
    """Over HTTPS with nothing but the token's fingerprint (no CA set up on the worker), the join,
    the heartbeats and the blob fetch all go through the pinned CA; a server that goes away is
    retried with backoff until it is back."""
    assert cli("tls", "init").returncode == 0
    import_file(data_dir, tiny_gguf, "tiny")
    ca_file = data_dir / "tls" / "ca.crt"
    port = free_port()
    serving = ServeProcess(data_dir, port, ca_file)
    try:
        token = serving.client.post("/api/v1/nodes/tokens", json={}).json()["token"]
        assert not token.startswith("apjoin1.-.")
        worker_dir = tmp_path / "worker"
        worker = workers(worker_dir, "join", serving.url, "--token", token, "--name", "tls1")
        node = wait_for(lambda: node_named(serving.client, "tls1"), "the node", worker)
        assigned = serving.client.post(f"/api/v1/nodes/{node['id']}/models", json={"model": "tiny"})
        assert assigned.status_code == 202
        wait_for(
            lambda: (
                (m := model_state(node_named(serving.client, "tls1"), "tiny:latest"))
                and m["state"] == "available"
            ),
            "the model fetched over the pinned TLS and loaded",
            worker,
        )
        saved = json.loads((worker_dir / "worker.json").read_text())
        assert saved["ca_pem"] == ca_file.read_text()
        assert saved["fingerprint"] == "sha256:" + token.split(".")[1]

        serving.stop()
        wait_for(lambda: "lost connection to" in worker.log, "the lost connection said", worker)
        serving = ServeProcess(data_dir, port, ca_file)
        wait_for(lambda: worker.log.count("connected to") >= 2, "connected again", worker)
        wait_for(
            lambda: (n := node_named(serving.client, "tls1")) and n["state"] == "ready",
            "heartbeats again",
            worker,
        )
        assert worker.log.count("lost connection to") == 1
    finally:
        serving.stop()
