"""The store on SQLite and on PostgreSQL side by side: model lists at 10,000 models, and progress writes.

Run from the repo root (PostgreSQL on loopback, as the tests use it):

    .venv/bin/python bench/store.py [--models 10000] [--requests 200] [--rounds 3]
        [--threads 4] [--seconds 3] [--backends sqlite,postgres]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/test]

For each backend it makes a store of its own (a temp data dir; on PostgreSQL also a schema of its
own, ``bench_<random>``, dropped at the end) and registers ``--models`` models through the store,
one GGUF artifact each with the tiny test model's real capabilities (no file is copied: lists never
open one). Then, each round and the backends in turn, it starts ``appliance serve`` on that store
and measures:

- ``--requests`` sequential requests each of ``/healthz`` (the floor), ``/v1/models`` and
  ``/api/tags``, real HTTP (httpx), each on a new connection as a CLI or a script makes it: p50
  and p99 in ms;
- once each, ``/v1/models`` and ``/api/tags`` after a model is added from this process (another
  process, as a CLI or a second server is): the one render a write costs;
- the store's progress write, ``update_download(id, bytes_done=…)`` in a tight loop from
  ``--threads`` threads for ``--seconds`` (each thread its own download row, as parallel pulls
  have): writes per second sustained, and p50/p99 of one write;
- the real throttle, ``ProgressWriter``, called in a tight loop by ``--threads`` pulls: the calls
  per second it absorbs and the row writes per second per pull it lets through (the design: at
  most a few a second, so a fast transfer never turns into a write storm);
- ``/v1/models`` again while those throttled pulls report progress (each fed 100 chunks a
  second): p50 and p99 of a list under the write load a pull really makes.

It prints each round's figures, then per metric the median and min-max over rounds for each
backend, PostgreSQL / SQLite, and PASS/MISS against the target: p99 ≤ 50 ms for ``/v1/models`` and
``/api/tags`` on both backends (every round). Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.models.formats import read_capabilities  # noqa: E402
from appliance.provision.downloads import ProgressWriter, PullProgress  # noqa: E402
from appliance.settings import Settings, StoreSettings  # noqa: E402
from appliance.store.base import Download, Store  # noqa: E402
from appliance.store.factory import open_data_dir  # noqa: E402
from bench.lists import register  # noqa: E402
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf  # noqa: E402

LISTS = ("/healthz", "/v1/models", "/api/tags")
TARGETS = ("/v1/models", "/api/tags")
TARGET_P99_MS = 50.0
CHUNKS_PER_SECOND = 100  # how often a pull under load reports progress to its ProgressWriter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass
class Backend:
    name: str
    settings: Settings
    store: Store
    env: dict[str, str]  # what ``serve`` needs to open the same store


@contextmanager
def postgres_schema(server_url: str) -> Iterator[str]:
    """A new schema on the server, as a URL whose connections land in it; dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        raise SystemExit(
            f"no PostgreSQL at {server_url}: {str(exc).strip()}\n"
            "pass --postgres-url, or --backends sqlite to measure SQLite alone"
        ) from exc
    separator = "&" if "?" in server_url else "?"
    try:
        yield f"{server_url}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextmanager
def serving(backend: Backend) -> Iterator[httpx.Client]:
    """``appliance serve`` of the code beside this script on the backend's store, on loopback."""
    port = free_port()
    data_dir = str(backend.settings.data_dir)
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--data-dir", data_dir, "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,  # ``-m`` looks in the working directory first
        env={**os.environ, "PYTHONPATH": str(REPO), **backend.env},
    )
    # No connection is kept: each request opens its own (a kept-alive one measures TCP's delayed
    # ACK, ~40 ms on a small answer, not the server).
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"appliance serve on {backend.name} did not answer /healthz")
            time.sleep(0.02)
        yield client
    finally:
        client.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fetch_ms(client: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    response = client.get(path)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise SystemExit(f"GET {path} answered {response.status_code}")
    return elapsed


def new_download(store: Store) -> str:
    download_id = uuid.uuid4().hex[:12]
    store.create_download(
        Download(
            id=download_id,
            ref=f"https://bench.invalid/{download_id}.gguf",
            state="running",
            requested_by="bench",
        )
    )
    return download_id


def in_threads(count: int, work: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def raw_writes(store: Store, *, threads: int, seconds: float) -> dict[str, float]:
    """``update_download`` in a tight loop from each thread, on a row of its own."""
    ids = [new_download(store) for _ in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    deadline = time.monotonic() + seconds

    def write(index: int) -> None:
        done = 0
        while time.monotonic() < deadline:
            done += 65536
            started = time.perf_counter()
            store.update_download(ids[index], bytes_done=done)
            latencies[index].append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    in_threads(threads, write)
    every = [value for own in latencies for value in own]
    return {
        "writes/s": len(every) / (time.monotonic() - started),
        "write p50 ms": statistics.median(every),
        "write p99 ms": percentile(every, 0.99),
    }


def throttled_pulls(
    store: Store, *, threads: int, done: Callable[[], bool], chunks_per_second: float | None
) -> tuple[int, int, float]:
    """``threads`` pulls feeding their ProgressWriter chunk after chunk (as fast as they can, or
    ``chunks_per_second``) until ``done()``: the calls made, the row writes let through, the time."""
    ids = [new_download(store) for _ in range(threads)]
    calls = [0] * threads
    writes = [0] * threads

    def pull(index: int) -> None:
        def counted(progress: PullProgress) -> None:  # called once per row write
            writes[index] += 1

        writer = ProgressWriter(store, ids[index], counted)
        received = 0
        while not done():
            received += 65536
            writer(received, None)
            calls[index] += 1
            if chunks_per_second:
                time.sleep(1 / chunks_per_second)

    started = time.monotonic()
    in_threads(threads, pull)
    return sum(calls), sum(writes), time.monotonic() - started


def one_round(
    backend: Backend, args: argparse.Namespace, extra_model: int, capabilities: dict[str, object]
) -> dict[str, float]:
    figures: dict[str, float] = {}
    with serving(backend) as client:
        for path in LISTS:
            fetch_ms(client, path)  # the first renders the cached answer: measured below, after a change
            times = [fetch_ms(client, path) for _ in range(args.requests)]
            figures[f"{path} p50 ms"] = statistics.median(times)
            figures[f"{path} p99 ms"] = percentile(times, 0.99)
        register(backend.store, extra_model, 1, capabilities)
        for path in TARGETS:
            figures[f"{path} after a change ms"] = fetch_ms(client, path)
        figures.update(raw_writes(backend.store, threads=args.threads, seconds=args.seconds))
        deadline = time.monotonic() + args.seconds
        calls, writes, elapsed = throttled_pulls(
            backend.store,
            threads=args.threads,
            done=lambda: time.monotonic() > deadline,
            chunks_per_second=None,
        )
        figures["throttle calls/s"] = calls / elapsed
        figures["throttle writes/s per pull"] = writes / elapsed / args.threads
        # Lists while the pulls report progress as a real transfer does, chunk by chunk.
        listed = threading.Event()
        pulls = threading.Thread(
            target=throttled_pulls,
            args=(backend.store,),
            kwargs={"threads": args.threads, "done": listed.is_set, "chunks_per_second": CHUNKS_PER_SECOND},
        )
        pulls.start()
        try:
            time.sleep(0.5)  # every pull under way
            times = [fetch_ms(client, "/v1/models") for _ in range(args.requests)]
        finally:
            listed.set()
            pulls.join()
        figures["/v1/models under pulls p50 ms"] = statistics.median(times)
        figures["/v1/models under pulls p99 ms"] = percentile(times, 0.99)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="writers, and pulls reporting progress")
    parser.add_argument("--seconds", type=float, default=3.0, help="each write measurement")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    names = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(names) - {"sqlite", "postgres"}
    if unknown or not names:
        raise SystemExit(f"--backends: sqlite and/or postgres, not {', '.join(sorted(unknown)) or 'nothing'}")
    with tempfile.TemporaryDirectory() as work, ExitStack() as stack:
        tiny = write_llama_gguf(Path(work) / "tiny.gguf", chat_template=TINY_CHAT_TEMPLATE)
        capabilities = read_capabilities(tiny, "gguf")
        backends: list[Backend] = []
        for name in names:
            url = stack.enter_context(postgres_schema(args.postgres_url)) if name == "postgres" else None
            settings = Settings(data_dir=Path(work) / name, store=StoreSettings(url=url))
            _, store = open_data_dir(settings)
            stack.callback(store.close)
            started = time.perf_counter()
            register(store, 0, args.models, capabilities)
            print(
                f"{name}: registered {args.models} models in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
            backends.append(Backend(name, settings, store, {"APPLIANCE_STORE__URL": url} if url else {}))
        print(
            f"{args.models} models, {args.requests} requests per list, {args.threads} threads for"
            f" {args.seconds:g} s per write measurement, cpu_count={os.cpu_count()}"
        )
        results: dict[str, list[dict[str, float]]] = {backend.name: [] for backend in backends}
        for round_number in range(args.rounds):
            for backend in backends:
                figures = one_round(backend, args, args.models + round_number, capabilities)
                results[backend.name].append(figures)
                print(f"round {round_number + 1} {backend.name}:")
                for metric, value in figures.items():
                    print(f"  {metric:<36} {shown(value):>10}")
        summarise(results, args)


def shown(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:.2f}"


def summarise(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    names = list(results)
    metrics = list(results[names[0]][0])
    print()
    header = f"{'metric (median, min-max over ' + str(args.rounds) + ' rounds)':<44}"
    header += "".join(f" {name:>24}" for name in names)
    if len(names) == 2:
        header += f" {names[1] + ' / ' + names[0]:>20}"
    print(header)
    for metric in metrics:
        medians = []
        line = f"{metric:<44}"
        for name in names:
            values = [figures[metric] for figures in results[name]]
            medians.append(statistics.median(values))
            spread = f"{shown(medians[-1])} ({shown(min(values))}-{shown(max(values))})"
            line += f" {spread:>24}"
        if len(names) == 2:
            line += f" {medians[1] / medians[0]:>19.2f}x" if medians[0] else f" {'-':>20}"
        print(line)
    print()
    for name in names:
        for path in TARGETS:
            worst = max(figures[f"{path} p99 ms"] for figures in results[name])
            verdict = "PASS" if worst <= TARGET_P99_MS else "MISS"
            print(f"{verdict} {name} {path}: worst p99 {worst:.2f} ms (target ≤ {TARGET_P99_MS:g} ms)")


if __name__ == "__main__":
    main()
