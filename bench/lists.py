"""Model lists at registry size: p50/p99 of each list endpoint beside ``/healthz``, in the same run.

Run from the repo root:

    .venv/bin/python bench/lists.py [--models 10000] [--requests 200] [--rounds 3]

It registers ``--models`` models through the store (one GGUF artifact each, with the tiny test
model's real capabilities, chat template included; no file is copied: lists never open one),
then starts ``appliance serve`` on them and measures, each round:

- exec ``serve`` → the first ``/healthz`` 200 (polled every 5 ms), with every model registered;
- ``--requests`` sequential requests per endpoint, each on a new connection, the endpoints in
  turn: ``/healthz`` (the floor), ``/v1/models``, ``/api/tags``, ``/api/v1/models?limit=100``
  (a page) and ``/healthz`` again;
- once each: the first ``/v1/models`` and ``/api/tags`` after a model is added from this process
  (another process, as the CLI is), the cost of rendering them again, and ``/api/v1/models``
  unpaged (every model with its capabilities, never cached).

It prints p50 and p99 in milliseconds per endpoint and round, and each p50 relative to
``/healthz``'s. Target: p99 ≤ 50 ms for ``/v1/models``, ``/api/tags`` and a page at 10,000 models.
Exit status 0 whatever the figures.

The server runs the code beside this script. To measure another commit the same way, unpack it
and run a copy of this script from there with the same Python:

    git archive <commit> appliance tests/__init__.py tests/tiny_model.py | tar -x -C /tmp/before
    mkdir /tmp/before/bench && cp bench/lists.py /tmp/before/bench/
    .venv/bin/python /tmp/before/bench/lists.py
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.models.formats import read_capabilities  # noqa: E402
from appliance.names import ModelName  # noqa: E402
from appliance.runtime import Runtime  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from appliance.store.base import NewArtifact, Store  # noqa: E402
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf  # noqa: E402

ENDPOINTS = ("/healthz", "/v1/models", "/api/tags", "/api/v1/models?limit=100", "/healthz")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def register(store: Store, first: int, count: int, capabilities: dict[str, object]) -> None:
    for index in range(first, first + count):
        artifact = NewArtifact(
            filename="model.gguf",
            format="gguf",
            digest=f"sha256:{index:064x}",
            size_bytes=1_000_000 + index,
            source_uri=f"hf:bench/model-{index}/model.gguf",
        )
        store.add_artifact(
            ModelName(f"bench/model-{index:05d}", "q4"), artifact, capabilities=capabilities, actor="bench"
        )


def fetch(port: int, path: str) -> float:
    """Seconds for one request on a new connection, as a CLI or a script makes it, its whole body
    read. (Kept-alive connections measure TCP's delayed ACK, not us: ~40 ms on a small answer.)"""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise SystemExit(f"GET {path} answered {response.status}")
    return time.perf_counter() - started


def wait_healthy(port: int, process: subprocess.Popen[bytes]) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + 60
    while True:
        try:
            fetch(port, "/healthz")
            return time.perf_counter() - started
        except (ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("appliance serve did not answer /healthz") from None
            time.sleep(0.005)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data_dir = Path(work) / "data"
        settings = Settings(data_dir=data_dir)
        tiny = write_llama_gguf(Path(work) / "tiny.gguf", chat_template=TINY_CHAT_TEMPLATE)
        capabilities = read_capabilities(tiny, "gguf")
        runtime = Runtime.open(settings)
        store = runtime.store
        started = time.perf_counter()
        register(store, 0, args.models, capabilities)
        print(f"registered {args.models} models in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(f"{args.models} models, {args.requests} requests per endpoint, cpu_count={os.cpu_count()}")
        print(f"{'round':<6} {'endpoint':<28} {'p50 ms':>8} {'p99 ms':>8} {'p50 / healthz':>14}")
        for round_number in range(args.rounds):
            port = free_port()
            # The code beside this file serves, whatever is installed: a copy of another commit's
            # tree with this script in it measures that commit.
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "appliance",
                    "--data-dir",
                    str(data_dir),
                    "serve",
                    "--port",
                    str(port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=REPO,  # ``-m`` looks in the working directory first
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            try:
                healthy = wait_healthy(port, process)
                p50s: dict[str, float] = {}
                for path in ENDPOINTS:
                    fetch(port, path)  # the first renders the cached answers; reported below
                    times = [fetch(port, path) * 1000 for _ in range(args.requests)]
                    p50s[path] = statistics.median(times)
                    ratio = p50s[path] / p50s["/healthz"]
                    print(
                        f"{round_number + 1:<6} {path:<28} {p50s[path]:>8.2f}"
                        f" {percentile(times, 0.99):>8.2f} {ratio:>13.1f}x"
                    )
                register(store, args.models + round_number, 1, capabilities)
                once = {
                    path: fetch(port, path) * 1000 for path in ("/v1/models", "/api/tags", "/api/v1/models")
                }
                print(
                    f"{round_number + 1:<6} exec serve → /healthz {healthy * 1000:.0f} ms; after a change:"
                    f" /v1/models {once['/v1/models']:.0f} ms, /api/tags {once['/api/tags']:.0f} ms;"
                    f" /api/v1/models unpaged {once['/api/v1/models']:.0f} ms"
                )
            finally:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        runtime.close()


if __name__ == "__main__":
    main()
