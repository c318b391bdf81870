"""The cluster's two costs, each against its reference in the same run, on loopback.

Run from the repo root (Debian packages: ``nginx``, ``curl``):

    .venv/bin/python bench/cluster.py [--size 2G] [--rounds 3] [--skip fetch|chat]
        [--dim 512 --layers 8 --max-tokens 64 --prompts 4 --threads N]

(a) fetch: a GGUF file of ``--size`` is imported into a server (``appliance serve``), and this
process joins it as a node. Each round, taking turns: the worker's own blob fetch
(``appliance.cluster.fetch.BlobFetcher``: Range parts from ``GET /api/v1/blobs/…`` with the node
credential, sha256, fsync, placed in a fresh cache) against ``curl -o`` of the same file from nginx
(``sendfile``, no cap). Throughput ratio ours / nginx per round and of the medians; target >= 0.8.

(b) chat: a random-weight model is loaded onto a real worker (``appliance worker join``) of a
server that only coordinates (``cluster.local_inference`` false), and the worker's data dir is
also served by its own ``appliance serve``. The same streamed chats go, in turns, through the
server (routed to the worker over the work channel) and to that direct server. Per request: time
to the first text, and tokens/s (completion tokens over the whole request). Targets: routed
tokens/s >= 0.95x direct, and at most 20 ms added to the median time to first token.

Medians and min-max spreads over rounds; PASS/MISS against the targets. The exit status is 0
whatever the ratios. ``--size 256M --rounds 1`` is a quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.servers import Server, free_port, start, start_nginx, wait_until_up, write_bench_model

GIB = 1 << 30
FETCH_TARGET = 0.8  # ours / nginx, throughput
TOKENS_TARGET = 0.95  # routed / direct, tokens/s
TTFT_TARGET_MS = 20.0  # routed - direct, median time to first token


def size_bytes(text: str) -> int:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M or 2G")
    return int(float(found[1]) * 1024 ** " KMG".index(found[2].upper() or " "))


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def appliance(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"appliance {' '.join(args)}: {done.stderr}")
    return done.stdout


def serve(data_dir: Path, log: Path, env: dict[str, str]) -> Server:
    """``appliance serve`` of ``data_dir`` on a free loopback port (plain HTTP, auth off)."""
    port = free_port()
    command = [sys.executable, "-m", "appliance", "--data-dir", str(data_dir), "serve", "--port", str(port)]
    return start(command, {**os.environ, **env}, f"http://127.0.0.1:{port}", "/healthz", log)


def join(server: Server, data_dir: Path, name: str) -> str:
    """A node credential for ``name``, traded for a fresh join token over the join route."""
    token = appliance(data_dir, "nodes", "token", "create", "--expires", "1h").strip()
    body = {"token": token, "name": name, "capabilities": {}}
    answer = httpx.post(f"{server.url}/api/v1/cluster/join", json=body, timeout=30)
    answer.raise_for_status()
    return str(answer.json()["credential"])


@contextmanager
def running(servers: list[Server | subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in reversed(servers):
            process = server.process if isinstance(server, Server) else server
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- (a) a blob from the server's cache vs nginx ---------------------------------------------------


def bench_fetch(work: Path, args: argparse.Namespace) -> tuple[int, list[tuple[float, float]]]:
    """The file's size, and (ours, nginx) seconds per round."""
    from appliance.cluster.fetch import BlobFetcher
    from appliance.settings import DownloadSettings
    from appliance.store.cache import BlobCache
    from tests.tiny_model import write_llama_gguf

    www = work / "www"
    www.mkdir()
    source = write_llama_gguf(www / "model.gguf", padding_bytes=args.size)
    size = source.stat().st_size
    data_dir = work / "fetch-server"
    imported = json.loads(appliance(data_dir, "models", "import", str(source), "--name", "big", "--json"))
    digest = imported["digest"]
    server = serve(data_dir, work / "fetch-server.log", {})
    nginx_port = free_port()
    prefix = work / "nginx"
    nginx = start_nginx(www, prefix, nginx_port)
    rounds: list[tuple[float, float]] = []
    with running([server, nginx]):
        wait_until_up(f"http://127.0.0.1:{nginx_port}/model.gguf", nginx, prefix / "error.log")
        credential = join(server, data_dir, "bench-fetch")
        print(f"(a) fetch: {size / GIB:.2f} GiB, {args.rounds} rounds", flush=True)
        for number in range(1, args.rounds + 1):
            out = work / f"fetch-{number}"
            subprocess.run(["sync"], check=True)
            fetcher = BlobFetcher(server.url, credential, BlobCache(out / "ours"), DownloadSettings())
            began = time.perf_counter()
            placed = fetcher.fetch(digest)
            ours = time.perf_counter() - began
            assert placed.stat().st_size == size
            subprocess.run(["sync"], check=True)
            began = time.perf_counter()
            target = out / "curl.gguf"
            subprocess.run(
                ["curl", "-sS", "-o", str(target), f"http://127.0.0.1:{nginx_port}/model.gguf"], check=True
            )
            theirs = time.perf_counter() - began
            assert target.stat().st_size == size
            rounds.append((ours, theirs))
            print(
                f"  round {number}: worker fetch {ours:6.2f} s ({size / GIB / ours:5.2f} GiB/s),"
                f" nginx+curl {theirs:6.2f} s ({size / GIB / theirs:5.2f} GiB/s)",
                flush=True,
            )
            shutil.rmtree(out)
    return size, rounds


def report_fetch(rounds: list[tuple[float, float]], size: int) -> None:
    ours = [o for o, _ in rounds]
    theirs = [t for _, t in rounds]
    per_round = [t / o for o, t in rounds]  # throughput ratio: ours / nginx
    ratio = statistics.median(theirs) / statistics.median(ours)
    gib = size / GIB
    print("\n| (a) fetch | median s | s min-max | median GiB/s |")
    print("|---|---:|---:|---:|")
    for name, seconds in (("worker blob fetch", ours), ("nginx + curl -o", theirs)):
        middle = statistics.median(seconds)
        print(f"| {name} | {middle:.2f} | {spread(seconds)} | {gib / middle:.2f} |")
    verdict = "PASS" if ratio >= FETCH_TARGET else "MISS"
    print(
        f"throughput ours / nginx: per round {' '.join(f'{r:.2f}' for r in per_round)}; of the medians"
        f" {ratio:.2f}: {verdict} (>= {FETCH_TARGET:g})"
    )


# -- (b) a chat routed through the server vs the worker's engine directly --------------------------


def chat(base_url: str, text: str, max_tokens: int) -> tuple[float, float]:
    """One streamed chat: (seconds to the first text, tokens/s over the whole request)."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - sent
    total = time.perf_counter() - sent
    return (first if first is not None else total), tokens / total


def wait_for(condition: Callable[[], Any], what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what}: not seen\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def bench_chat(work: Path, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Per way ("routed", "direct"): (seconds to first text, tokens/s) of every request."""
    model = work / "bench.gguf"
    write_bench_model(model, dim=args.dim, layers=args.layers)
    engine = {
        "APPLIANCE_ENGINE__PARALLEL": "1",
        "APPLIANCE_ENGINE__CONTEXT_LENGTH": str(args.context),
        "APPLIANCE_ENGINE__THREADS": str(args.threads),
    }
    server_dir, worker_dir = work / "chat-server", work / "chat-worker"
    appliance(server_dir, "models", "import", str(model), "--name", "bench")
    coordinator = serve(
        server_dir, work / "chat-server.log", {**engine, "APPLIANCE_CLUSTER__LOCAL_INFERENCE": "false"}
    )
    servers: list[Server | subprocess.Popen[bytes]] = [coordinator]
    results: dict[str, list[tuple[float, float]]] = {"routed": [], "direct": []}
    with running(servers):
        token = appliance(server_dir, "nodes", "token", "create", "--expires", "1h").strip()
        worker_log = work / "chat-worker.log"
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [
                    *(sys.executable, "-m", "appliance", "worker", "join", coordinator.url),
                    *("--token", token, "--name", "w1", "--data-dir", str(worker_dir)),
                ],
                env={**os.environ, **engine},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        servers.append(worker)

        def available() -> bool:
            answer = httpx.get(f"{coordinator.url}/api/v1/nodes/w1", timeout=10)
            return answer.status_code == 200 and any(
                m["model"] == "bench:latest" and m["state"] == "available" for m in answer.json()["models"]
            )

        wait_for(
            lambda: httpx.get(f"{coordinator.url}/api/v1/nodes/w1", timeout=10).status_code == 200,
            "w1 joined",
            worker,
            worker_log,
        )
        appliance(server_dir, "nodes", "load", "w1", "bench")
        wait_for(available, "bench available on w1", worker, worker_log)
        # The worker's data dir, with the blob it fetched, served on its own: its engine, called directly.
        appliance(worker_dir, "models", "import", str(model), "--name", "bench")
        direct = serve(worker_dir, work / "chat-direct.log", engine)
        servers.append(direct)
        ways = {"routed": coordinator.url, "direct": direct.url}
        for url in ways.values():  # warm: each engine has the model loaded and its first request behind it
            chat(url, "warm up", args.max_tokens)
        print(
            f"(b) chat: {model.stat().st_size / 1e6:.0f} MB model (dim {args.dim}, {args.layers} layers),"
            f" {args.max_tokens} tokens per request, {args.prompts} prompts, {args.rounds} rounds,"
            f" {args.threads} threads",
            flush=True,
        )
        for number in range(1, args.rounds + 1):
            order = list(ways) if number % 2 else list(reversed(ways))
            for index in range(args.prompts):
                text = f"Prompt {index}: tell me about the number {index * 7 + 3}."
                for way in order:
                    ttft, rate = chat(ways[way], text, args.max_tokens)
                    results[way].append((ttft, rate))
            routed, direct_runs = results["routed"][-args.prompts :], results["direct"][-args.prompts :]
            print(
                f"  round {number}: routed {statistics.median(r for _, r in routed):7.1f} tok/s"
                f" TTFT {statistics.median(t for t, _ in routed) * 1000:6.1f} ms;"
                f" direct {statistics.median(r for _, r in direct_runs):7.1f} tok/s"
                f" TTFT {statistics.median(t for t, _ in direct_runs) * 1000:6.1f} ms",
                flush=True,
            )
        with httpx.Client(base_url=coordinator.url) as api:
            nodes = {record["node"] for record in api.get("/api/v1/inference", params={"limit": 1000}).json()}
        if nodes != {"w1"}:
            raise SystemExit(f"routed requests were served by {sorted(nodes)}, not w1 alone")
    return results


def report_chat(results: dict[str, list[tuple[float, float]]], prompts: int) -> None:
    print("\n| (b) chat | median tok/s | tok/s min-max (round medians) | median TTFT ms | TTFT ms min-max |")
    print("|---|---:|---:|---:|---:|")
    medians: dict[str, tuple[float, float]] = {}
    per_round: dict[str, list[tuple[float, float]]] = {}
    for way, runs in results.items():
        rounds = [runs[start : start + prompts] for start in range(0, len(runs), prompts)]
        per_round[way] = [
            (statistics.median(t for t, _ in chunk) * 1000, statistics.median(r for _, r in chunk))
            for chunk in rounds
        ]
        rate = statistics.median(r for _, r in runs)
        ttft = statistics.median(t for t, _ in runs) * 1000
        medians[way] = (ttft, rate)
        rates = [r for _, r in per_round[way]]
        ttfts = [t for t, _ in per_round[way]]
        print(f"| {way} | {rate:.1f} | {spread(rates)} | {ttft:.1f} | {spread(ttfts)} |")
    ratio = medians["routed"][1] / medians["direct"][1]
    added = medians["routed"][0] - medians["direct"][0]
    ratios = [r[1] / d[1] for r, d in zip(per_round["routed"], per_round["direct"], strict=True)]
    adds = [r[0] - d[0] for r, d in zip(per_round["routed"], per_round["direct"], strict=True)]
    print(
        f"tokens/s routed / direct: per round {' '.join(f'{r:.3f}' for r in ratios)}; of the medians"
        f" {ratio:.3f}: {'PASS' if ratio >= TOKENS_TARGET else 'MISS'} (>= {TOKENS_TARGET:g})"
    )
    print(
        f"TTFT added by routing: per round {' '.join(f'{a:.1f}' for a in adds)} ms; of the medians"
        f" {added:.1f} ms: {'PASS' if added <= TTFT_TARGET_MS else 'MISS'} (<= {TTFT_TARGET_MS:g} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=size_bytes, default=2 * GIB, help="the blob for (a), like 256M or 2G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", action="append", choices=("fetch", "chat"), default=[])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="chats per way per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-", dir=args.workdir))
    try:
        fetched = None if "fetch" in args.skip else bench_fetch(work, args)
        chatted = None if "chat" in args.skip else bench_chat(work, args)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if fetched:
            report_fetch(fetched[1], fetched[0])
        if chatted:
            report_chat(chatted, args.prompts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
