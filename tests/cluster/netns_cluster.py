"""Run inside fresh network and mount namespaces (``unshare -n -m``): a server and two workers, each
worker in a network namespace of its own, joined to this one by a veth pair on its own /30 with no
default route, so it reaches the server's address on its link and nothing else. Nothing here
touches the host's network, nor its ``/run/netns`` (a tmpfs in this mount namespace holds the
namespaces' names).

The server serves TLS on both link addresses; the workers trust it by the join token's fingerprint
alone. It pulls two models from a file server in this namespace (on loopback, which no worker can
reach), tells worker 2 to load one and worker 1 to load and unload the other, answers chats routed
to them, SIGKILLs worker 2 mid-answer and runs it again, and refuses joins with wrong, expired
and revoked tokens. Prints what happened as one JSON line; ``tests/cluster/test_e2e_netns.py``
judges it.

Usage: python -m tests.cluster.netns_cluster WORK_DIR
"""

from __future__ import annotations

import ctypes
import http.server
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import openai

from tests.conftest import APPLIANCE, free_port
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf

T = TypeVar("T")

# Each worker's link: (this namespace's end, the worker's end) of a /30.
LINKS = {"w1": ("10.79.1.1", "10.79.1.2"), "w2": ("10.79.2.1", "10.79.2.2")}
LINK_ADDRESSES = [near for near, _ in LINKS.values()]  # the server's
WAIT_SECONDS = 120
PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent() -> None:
    """In a child before it runs: SIGKILL it when this driver dies (a test's timeout), so that no
    server or worker outlives the namespaces."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def probe(address: str, port: int, netns: str | None = None) -> str:
    """What a TCP connect to ``address:port`` gets from ``netns`` (None: this namespace):
    ``connected`` or the errno's name."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(); s.settimeout(3)\n"
        "try:\n"
        f"    s.connect(({address!r}, {port})); print('connected')\n"
        "except TimeoutError:\n"
        "    print('timeout')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode.get(e.errno or 0, str(e)))\n"
    )
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def listening(netns: str) -> list[str]:
    """The TCP sockets listening in ``netns``, as ``ss -ltn`` lists them (its header dropped)."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-ltn"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[1:]


@contextmanager
def worker_namespaces() -> Iterator[dict[str, str]]:
    """Two named namespaces, each on its own veth link to this one; removed however this ends."""
    # The mount point may not exist on a fresh machine (`ip netns add` makes it, once ever run).
    Path("/run/netns").mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/netns"], check=True)
    sh("ip", "link", "set", "lo", "up")
    tag = secrets.token_hex(3)
    names = {worker: f"ap-{worker}-{tag}" for worker in LINKS}
    try:
        for worker, (near, far) in LINKS.items():
            netns, veth = names[worker], f"ap{worker}{tag}"
            sh("ip", "netns", "add", netns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            sh("ip", "addr", "add", f"{near}/30", "dev", veth)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", netns, "addr", "add", f"{far}/30", "dev", "eth0")
            sh("ip", "-n", netns, "link", "set", "eth0", "up")
            sh("ip", "-n", netns, "link", "set", "lo", "up")
        yield names
    finally:
        for netns in names.values():  # its end of the veth pair goes with it, and the pair with that
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


class FileServer:
    """A plain HTTP server on loopback that counts the requests for each path."""

    def __init__(self, root: Path) -> None:
        self.asked: Counter[str] = Counter()
        lock = threading.Lock()
        asked = self.asked

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def send_head(self) -> Any:
                with lock:
                    asked[f"{self.command} {self.path}"] += 1
                return super().send_head()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Appliance:
    """The server's data dir and its ``appliance serve`` process."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.key = ""

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*APPLIANCE, "--data-dir", str(self.data_dir), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"appliance {' '.join(args)}: {done.stderr}")
        return done.stdout

    def serve(self, **env: str) -> None:
        with (self.data_dir.parent / "serve.log").open("a") as log:
            self._start(log, env)
        wait(lambda: self._ready(), "the server listening")

    def _start(self, log: IO[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [
                *APPLIANCE,
                "--data-dir",
                str(self.data_dir),
                "serve",
                "--host",
                "0.0.0.0",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # the addresses workers use, as the Host header names them
            # and a short long-poll, so that a restart does not wait for the workers' polls to end
            env={
                **os.environ,
                "APPLIANCE_SERVER__PUBLIC_NAMES": json.dumps(LINK_ADDRESSES),
                "APPLIANCE_CLUSTER__WORK_WAIT": "5s",
                **env,
            },
            preexec_fn=die_with_parent,
        )

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise SystemExit(f"serve exited with status {self.process.returncode}")
        try:
            return self.client().get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def url(self, worker: str) -> str:
        return f"https://{LINKS[worker][0]}:{self.port}"

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.data_dir / "tls" / "ca.crt")

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.url("w1"), verify=self.trust(), headers=headers, timeout=60)

    def node(self, name: str) -> dict[str, Any] | None:
        with self.client() as client:
            answer = client.get(f"/api/v1/nodes/{name}")
        return answer.json() if answer.status_code == 200 else None

    def heartbeat_since(self, name: str, since: float) -> bool:
        """Whether node ``name`` is ready and heartbeated after ``since`` (``time.monotonic``)."""
        node = self.node(name)
        if node is None or node["seconds_since_heartbeat"] is None or node["state"] != "ready":
            return False
        return bool(node["seconds_since_heartbeat"] < time.monotonic() - since)

    def loaded(self, name: str) -> list[str] | None:
        node = self.node(name)
        return None if node is None else list(node["load"].get("loaded", []))

    def model_state(self, node: str, model: str) -> str | None:
        found = self.node(node)
        entry = next((m for m in found["models"] if m["model"] == model), None) if found else None
        return entry["state"] if entry else None

    def chat_broken_off(self, model: str, worker: Worker) -> dict[str, Any]:
        """A long streamed chat whose worker is SIGKILLed once its first words arrived: what the
        client saw, and what the inference log recorded."""
        seen: dict[str, Any] = {"chunks": 0, "error": None, "finish_reason": None}
        with openai.DefaultHttpxClient(verify=self.trust()) as http:
            client = openai.OpenAI(
                base_url=f"{self.url('w1')}/v1", api_key=self.key, http_client=http, max_retries=0
            )
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=100_000,
                stream=True,
                temperature=0,  # greedy: the same long answer every run, so the kill always lands mid-answer
            )
            try:
                for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            seen["chunks"] += 1
                        seen["finish_reason"] = choice.finish_reason or seen["finish_reason"]
                    if seen["chunks"] == 1 and "killed" not in seen:
                        assert worker.process is not None
                        # Stopped first: the tiny model is fast enough to finish while a kill is delivered.
                        worker.process.send_signal(signal.SIGSTOP)
                        worker.process.kill()
                        seen["killed"] = worker.process.wait(timeout=30)
            except openai.APIError as error:
                seen["error"] = str(error)
        with self.client() as api:
            [record] = api.get("/api/v1/inference", params={"limit": 1}).json()
        seen["logged"] = {key: record[key] for key in ("node", "outcome", "model")}
        return seen

    def chat(self, model: str) -> dict[str, Any]:
        """A chat through the openai client; what the inference log recorded for it."""
        with openai.DefaultHttpxClient(verify=self.trust()) as http:
            client = openai.OpenAI(
                base_url=f"{self.url('w1')}/v1", api_key=self.key, http_client=http, max_retries=0
            )
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
            )
        with self.client() as api:
            [record] = api.get("/api/v1/inference", params={"limit": 1}).json()
        tokens = answer.usage.completion_tokens if answer.usage else None
        return {
            "tokens": tokens,
            "node": record["node"],
            "reason": record["reason"],
            "model": record["model"],
        }


class Worker:
    def __init__(self, name: str, netns: str, work_dir: Path) -> None:
        self.name = name
        self.netns = netns
        self.data_dir = work_dir / name
        self.log_path = work_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *APPLIANCE, "worker", *args]

    def join(self, url: str, token: str) -> None:
        self.start("join", url, "--token", token, "--name", self.name)

    def start(self, *args: str) -> None:
        with self.log_path.open("a") as log:
            command = self.command(*args, "--data-dir", str(self.data_dir))
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait(
    condition: Callable[[], T | None],
    what: str,
    *,
    watch: Iterable[Worker] = (),
    timeout: float = WAIT_SECONDS,
) -> T:
    """``condition``'s value once true; SystemExit past ``timeout`` or when a watched worker exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for worker in watch:
            if worker.process is not None and worker.process.poll() is not None:
                raise SystemExit(f"{what}: {worker.name} exited with status {worker.process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not seen in {timeout} s")
        time.sleep(0.2)


def refused_join(worker: Worker, url: str, token: str, work_dir: Path, label: str) -> dict[str, Any]:
    """``appliance worker join`` with a token the server must refuse, from a worker's namespace."""
    data_dir = work_dir / f"refused-{label}"
    command = worker.command(
        "join", url, "--token", token, "--name", f"refused-{label}", "--data-dir", str(data_dir)
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    lines = done.stderr.strip().splitlines()
    return {
        "exit": done.returncode,
        "said": lines[0] if lines else "",
        "joined": (data_dir / "worker.json").exists(),
    }


def main(work_dir: Path) -> None:
    report: dict[str, Any] = {}
    files = work_dir / "files"
    files.mkdir(parents=True)
    # a long context, so that an answer runs long enough to be broken off
    write_llama_gguf(files / "tiny.gguf", chat_template=TINY_CHAT_TEMPLATE, context=8192)
    write_llama_gguf(files / "other.gguf", chat_template=TINY_CHAT_TEMPLATE, seed=1, name="other")
    origin = FileServer(files)
    server = Appliance(work_dir / "server")
    with worker_namespaces() as names:
        workers = {name: Worker(name, netns, work_dir) for name, netns in names.items()}
        report["namespaces"] = list(names.values())
        try:
            run(report, server, workers, origin, work_dir)
        finally:
            for worker in workers.values():
                worker.stop()
            server.stop()
    report["file_server"] = dict(origin.asked)
    print(json.dumps(report))


def run(
    report: dict[str, Any], server: Appliance, workers: dict[str, Worker], origin: FileServer, work_dir: Path
) -> None:
    w1, w2 = workers["w1"], workers["w2"]
    live = list(workers.values())
    made = server.cli("tls", "init", "--names", ",".join(LINK_ADDRESSES))
    report["fingerprint"] = next(
        line.split(": ", 1)[1] for line in made.splitlines() if line.startswith("CA fingerprint")
    )
    server.cli("users", "add", "root", "--role", "admin", "--password-stdin", stdin="a long passphrase\n")
    server.key = server.cli("keys", "create", "--user", "root").strip()
    for model in ("tiny", "other"):
        server.cli("models", "pull", f"{origin.url}/{model}.gguf", "--name", model)
    report["file_server_after_pull"] = dict(origin.asked)
    server.serve()

    token = server.cli("nodes", "token", "create", "--expires", "1h").strip()
    report["token_fingerprint"] = token.split(".")[1]
    for worker in workers.values():
        worker.join(server.url(worker.name), token)
    for name in workers:
        wait(partial(server.heartbeat_since, name, 0.0), f"{name} joined", watch=live)

    # The network as the workers see it, and as the server sees them.
    report["w1_to_server"] = probe(LINKS["w1"][0], server.port, w1.netns)
    report["w1_to_w2"] = probe(LINKS["w2"][1], server.port, w1.netns)
    report["w2_to_w1"] = probe(LINKS["w1"][1], server.port, w2.netns)
    report["w1_to_file_server"] = probe("127.0.0.1", int(origin.url.rsplit(":", 1)[1]), w1.netns)
    report["listening"] = {worker.name: listening(worker.netns) for worker in workers.values()}
    report["server_to"] = {
        worker.name: probe(LINKS[worker.name][1], server.port) for worker in workers.values()
    }

    # A model onto worker 2, from the server's cache; a chat goes where it is loaded.
    server.cli("nodes", "load", "w2", "tiny")
    wait(lambda: server.model_state("w2", "tiny:latest") == "available", "tiny available on w2", watch=live)
    report["chat_tiny"] = server.chat("tiny")

    # A second model that only worker 1 has cached: loaded there, then unloaded (its file stays).
    server.cli("nodes", "load", "w1", "other")
    wait(lambda: server.model_state("w1", "other:latest") == "available", "other available on w1", watch=live)
    server.cli("nodes", "unload", "w1", "other")
    wait(
        lambda: server.model_state("w1", "other:latest") == "cached" and server.loaded("w1") == [],
        "other cached, not loaded, on w1",
        watch=live,
    )
    report["w2_models"] = [m["model"] for m in (server.node("w2") or {"models": []})["models"]]
    # With its own engine a candidate, the server holds every model as cached as worker 1 does.
    report["chat_other_local_inference"] = server.chat("other")

    # The server restarted as one that only coordinates: worker 1 is the only candidate with it.
    server.stop()
    restarted = time.monotonic()
    server.serve(APPLIANCE_CLUSTER__LOCAL_INFERENCE="false")
    for name in workers:
        wait(partial(server.heartbeat_since, name, restarted), f"{name} heartbeating again", watch=live)
    report["chat_other_coordinating"] = server.chat("other")

    # Worker 2 killed mid-answer: the client's stream ends with an error, not a cut-off reply;
    # restarted, it comes back as the same node with its cache intact.
    report["killed_mid_answer"] = server.chat_broken_off("tiny", w2)
    rerun = time.monotonic()
    w2.start("run")
    wait(partial(server.heartbeat_since, "w2", rerun), "w2 heartbeating after its restart", watch=live)
    wait(
        lambda: server.model_state("w2", "tiny:latest") == "available",
        "tiny available on w2 again",
        watch=live,
    )
    report["chat_after_restart"] = server.chat("tiny")

    # Tokens the server must refuse, through the worker's own command.
    prefix, secret = token.rsplit(".", 1)
    wrong = f"{prefix}.{secrets.token_urlsafe(len(secret))[: len(secret)]}"
    expiring = json.loads(server.cli("nodes", "token", "create", "--expires", "1s", "--json"))
    revoked = json.loads(server.cli("nodes", "token", "create", "--json"))
    server.cli("nodes", "token", "rm", revoked["id"])
    time.sleep(1.5)
    url = server.url("w1")
    report["refused"] = {
        "wrong": refused_join(w1, url, wrong, work_dir, "wrong"),
        "expired": refused_join(w1, url, expiring["token"], work_dir, "expired"),
        "revoked": refused_join(w1, url, revoked["token"], work_dir, "revoked"),
    }
    with server.client() as client:
        report["nodes"] = sorted(node["name"] for node in client.get("/api/v1/nodes").json())
    report["fetched_from_server"] = {worker.name: worker.log.count("fetching") for worker in workers.values()}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
