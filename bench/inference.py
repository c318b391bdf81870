"""Inference throughput and time to first token against llama-cpp-python, measured in the same run.

Run from the repo root (``make bench`` installs the ``bench`` extra, which brings ``llama_cpp.server``):

    .venv/bin/python bench/inference.py [--max-tokens 128] [--requests 2] [--concurrency 1 4 8]
        [--llama-server PATH] [--appliance NAME=PYTHON ...]

It writes a random-weight llama GGUF of a few hundred MB (F16, ``--dim``/``--layers``), then
runs the same chat requests (distinct prompts, greedy sampling, ``max_tokens`` each) through:

- (a) ``direct``: llama-cpp-python's ``Llama`` in this process, streamed ``create_completion``
  of the prompt rendered with the same template (so that a stopping criterion can count the
  sampled tokens, which the chat call does not pass on); it decodes one sequence at a time,
  so concurrent clients take turns on a lock (as ``llama_cpp.server`` does);
- (b) ``appliance``: ``appliance serve`` and its streamed ``/v1/chat/completions``;
- (c) ``llama_cpp.server``: llama-cpp-python's own OpenAI-compatible server, streamed;
- (d) ``llama-server``: llama.cpp's C++ server with ``-np`` slots, when ``--llama-server PATH``
  names a binary built from the sources vendored in the llama-cpp-python sdist (see
  BENCHMARKS.md); it batches like the appliance and is the limit to chase.

At each concurrency C, C clients each send ``--requests`` requests one after another. Aggregate
tokens/s is all completion tokens over the wall time; TTFT is the time from sending a request to
its first streamed text. All engines are started first, then their runs take turns for
``--rounds`` rounds; the report gives the median round's tokens/s and the median TTFT of all
rounds. Every engine gets the same threads, context and prompt format (the GGUF's own chat
template). The exit status is 0 whatever the ratios.

``--appliance NAME=PYTHON`` (repeatable) measures other builds in the same run, each as engine
NAME: PYTHON is the interpreter of a venv with that build installed (``PYTHON -m appliance``).
The report then gives each build's ratios side by side and each build against the first one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.servers import (  # needs the repo root on sys.path
    Server,
    free_port,
    start,
    start_appliance,
    start_llama_server,
    write_bench_model,
)
from tests.tiny_model import TINY_CHAT_TEMPLATE

# One request: (seconds to the first text, completion tokens) from a streamed call.
Request = Callable[[str], tuple[float, int]]


@dataclass
class Result:
    engine: str
    concurrency: int
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.ttfts) * 1000


def prompt(index: int) -> str:
    # Short: the test vocabulary spends a token per byte, where a real tokenizer spends one per word.
    return f"Story {index}."


def run_clients(engine: str, request: Request, concurrency: int, per_client: int) -> Result:
    def client(first: int) -> list[tuple[float, int]]:
        return [request(prompt(first + step)) for step in range(per_client)]

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = [item for part in pool.map(client, range(0, concurrency * 100, 100)) for item in part]
    seconds = time.perf_counter() - began
    return Result(engine, concurrency, sum(t for _, t in outcomes), seconds, [f for f, _ in outcomes])


# -- (a) Llama in this process -------------------------------------------------------------------


def chat_prompt(text: str) -> str:
    """The GGUF's chat template rendered as Llama's chat handler does; Llama adds the BOS token."""
    template = jinja2.Template(TINY_CHAT_TEMPLATE)
    rendered: str = template.render(
        messages=[{"role": "user", "content": text}], bos_token="", add_generation_prompt=True
    )
    return rendered


def direct_request(model: Path, args: argparse.Namespace) -> Request:
    import llama_cpp

    llama = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=args.context,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=-1,
        verbose=False,
    )
    lock = threading.Lock()  # Llama holds one sequence: concurrent callers take turns

    def request(text: str) -> tuple[float, int]:
        sampled = 0

        def count(*_: object) -> bool:
            nonlocal sampled
            sampled += 1
            return False

        sent = time.perf_counter()
        with lock:
            first: float | None = None
            chunks = llama.create_completion(
                chat_prompt(text),
                max_tokens=args.max_tokens,
                temperature=0,
                stop=["</s>"],  # what Llama's chat handler adds for this template
                stream=True,
                stopping_criteria=llama_cpp.StoppingCriteriaList([count]),
            )
            for chunk in chunks:
                if first is None and chunk["choices"][0]["text"]:  # type: ignore[index]
                    first = time.perf_counter() - sent
        # Called once per sampled token (end of generation included) and once more at the end.
        return first or time.perf_counter() - sent, sampled - 1

    return request


# -- (b) and (c): OpenAI-compatible servers ------------------------------------------------------


def streamed_request(base_url: str, model: str, args: argparse.Namespace) -> Request:
    def request(text: str) -> tuple[float, int]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.perf_counter()
        first: float | None = None
        counted = 0
        usage: int | None = None
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first if first is not None else time.perf_counter() - sent
                        counted += 1
        return first or time.perf_counter() - sent, usage if usage is not None else counted

    return request


def appliance_server(
    model: Path, work: Path, args: argparse.Namespace, *, name: str, python: str
) -> tuple[Server, Request]:
    server = start_appliance(
        model,
        work,
        name=name,
        python=python,
        parallel=max(args.concurrency),
        context=args.context,
        threads=args.threads,
    )
    return server, streamed_request(server.url, "bench", args)


def llama_cpp_server(model: Path, work: Path, args: argparse.Namespace) -> tuple[Server, Request]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(args.context),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_gpu_layers",
        "-1",
        "--interrupt_requests",
        "False",  # by default a new request cuts off the one streaming; queue instead
    ]
    server = start(
        command, dict(os.environ), f"http://127.0.0.1:{port}", "/v1/models", work / "llama_cpp.log"
    )
    return server, streamed_request(server.url, "bench", args)


def cpp_llama_server(model: Path, work: Path, args: argparse.Namespace) -> tuple[Server, Request]:
    slots = max(args.concurrency)
    server = start_llama_server(
        args.llama_server, model, work, slots=slots, context=args.context, threads=args.threads
    )
    return server, streamed_request(server.url, "bench", args)


def has_llama_cpp_server() -> bool:
    try:
        import sse_starlette  # noqa: F401 (llama_cpp.server's extra)
        import starlette_context  # noqa: F401
    except ImportError:
        return False
    return True


def median_result(runs: list[Result]) -> Result:
    """The run with the median tokens/s, carrying every run's TTFTs."""
    middle = sorted(runs, key=lambda run: run.tokens_per_second)[len(runs) // 2]
    return Result(
        middle.engine, middle.concurrency, middle.tokens, middle.seconds, [t for r in runs for t in r.ttfts]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024, help="context per sequence")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    parser.add_argument("--appliance", action="append", metavar="NAME=PYTHON", help="a build to measure")
    args = parser.parse_args()
    entries = [entry.partition("=") for entry in args.appliance or [f"appliance={sys.executable}"]]
    if any(not name or not python for name, _, python in entries):
        raise SystemExit("--appliance takes NAME=PYTHON, e.g. before=../old/.venv/bin/python")
    builds = {name: python for name, _, python in entries}

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch, contextlib.ExitStack() as servers:
        work = Path(scratch)
        model = work / "bench.gguf"
        write_bench_model(model, dim=args.dim, layers=args.layers)
        print(
            f"model: {model.stat().st_size / 1e6:.0f} MB F16 (dim {args.dim}, {args.layers} layers);"
            f" {args.max_tokens} tokens per request, {args.requests} requests per client,"
            f" {args.rounds} rounds, {args.threads} threads;"
            f" load {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
            flush=True,
        )
        # Every engine is started (an idle server uses no CPU), then the runs take turns, so that
        # a slow moment of the machine does not fall on one engine only.
        engines: dict[str, Request] = {"direct": direct_request(model, args)}
        launchers: list[tuple[str, Callable[[Path, Path, argparse.Namespace], tuple[Server, Request]]]] = [
            (name, functools.partial(appliance_server, name=name, python=python))
            for name, python in builds.items()
        ]
        launchers.append(("llama_cpp.server", llama_cpp_server))
        if args.llama_server:
            launchers.append(("llama-server", cpp_llama_server))
        for name, launch in launchers:
            if name == "llama_cpp.server" and not has_llama_cpp_server():
                print("  llama_cpp.server: not installed (pip install -e '.[bench]')")
                continue
            server, engines[name] = launch(model, work, args)
            servers.callback(server.stop)
        for request in engines.values():
            request(prompt(99_999))  # warm-up: loads the model, fills caches

        runs: dict[tuple[str, int], list[Result]] = {}
        for round_number in range(1, args.rounds + 1):
            for concurrency in args.concurrency:
                for name, request in engines.items():
                    result = run_clients(name, request, concurrency, args.requests)
                    runs.setdefault((name, concurrency), []).append(result)
                    print(
                        f"  round {round_number} {name:<18} c={concurrency:<2} {result.tokens:>5} tokens in"
                        f" {result.seconds:6.2f} s: {result.tokens_per_second:7.1f} tok/s,"
                        f" TTFT {result.ttft_ms:7.1f} ms",
                        flush=True,
                    )

    results = {
        name: [median_result(runs[name, concurrency]) for concurrency in args.concurrency] for name in engines
    }
    report(results, args, builds=list(builds))
    if len(builds) > 1:
        compare(results, runs, list(builds), args)


def report(results: dict[str, list[Result]], args: argparse.Namespace, *, builds: list[str]) -> None:
    def at(engine: str, concurrency: int) -> Result | None:
        return next((r for r in results.get(engine, []) if r.concurrency == concurrency), None)

    print("\n| engine | " + " | ".join(f"c={c} tok/s | c={c} TTFT ms" for c in args.concurrency) + " |")
    print("|---|" + "---:|---:|" * len(args.concurrency))
    for engine, rows in results.items():
        cells = " | ".join(f"{r.tokens_per_second:.1f} | {r.ttft_ms:.0f}" for r in rows)
        print(f"| {engine} | {cells} |")

    print()
    for ours in builds:
        ours_1, direct_1 = at(ours, 1), at("direct", 1)
        ours_top = at(ours, max(args.concurrency))
        if ours_1 and direct_1:
            ratio = ours_1.tokens_per_second / direct_1.tokens_per_second
            print(
                f"{ours} / direct at c=1: {ratio:.2f} (target >= 0.97: {'PASS' if ratio >= 0.97 else 'MISS'})"
            )
        if ours_1 and ours_top:
            ratio = ours_top.tokens_per_second / ours_1.tokens_per_second
            print(
                f"{ours} c={ours_top.concurrency} / {ours} c=1: {ratio:.2f}"
                f" (target >= 3: {'PASS' if ratio >= 3 else 'MISS'})"
            )
        for other in ("llama_cpp.server", "llama-server"):
            other_top = at(other, max(args.concurrency))
            if ours_top and other_top:
                ratio = ours_top.tokens_per_second / other_top.tokens_per_second
                print(f"{ours} / {other} at c={ours_top.concurrency}: {ratio:.2f}")


def compare(
    results: dict[str, list[Result]],
    runs: dict[tuple[str, int], list[Result]],
    builds: list[str],
    args: argparse.Namespace,
) -> None:
    """Each build side by side: tokens/s (min-max over rounds), TTFT, and the ratio to the first build."""
    first = builds[0]
    print(
        "\n| figure | " + " | ".join(builds) + " | " + " | ".join(f"{b} / {first}" for b in builds[1:]) + " |"
    )
    print("|---|" + "---:|" * (2 * len(builds) - 1))
    for index, concurrency in enumerate(args.concurrency):
        speeds = {b: [r.tokens_per_second for r in runs[b, concurrency]] for b in builds}
        medians = {b: results[b][index] for b in builds}
        cells = [
            f"{medians[b].tokens_per_second:.1f} ({min(speeds[b]):.1f}-{max(speeds[b]):.1f})" for b in builds
        ]
        ratios = [
            f"{medians[b].tokens_per_second / medians[first].tokens_per_second:.2f}" for b in builds[1:]
        ]
        print(f"| c={concurrency} tok/s (range) | " + " | ".join(cells + ratios) + " |")
        cells = [f"{medians[b].ttft_ms:.0f}" for b in builds]
        ratios = [f"{medians[b].ttft_ms / medians[first].ttft_ms:.2f}" for b in builds[1:]]
        print(f"| c={concurrency} TTFT ms | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
