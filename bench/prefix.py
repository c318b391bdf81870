"""Time to first token when prompts share a prefix: prompt reuse against decoding it all again.

Run from the repo root:

    .venv/bin/python bench/prefix.py [--rounds 3] [--system-tokens 1000] [--turns 10] [--clients 8]
        [--llama-server PATH]

It writes the random-weight llama GGUF of ``bench/inference.py`` (the test vocabulary spends one
token per byte, so a 1,000-byte system prompt is about 1,000 tokens) and serves it from:

- ``reuse``: ``appliance serve`` as it ships (``engine.prompt_reuse`` on);
- ``no-reuse``: the same build with ``APPLIANCE_ENGINE__PROMPT_REUSE=false``;
- ``llama-server``: llama.cpp's C++ server with ``--parallel`` slots (its prompt cache is on by
  default), when ``--llama-server PATH`` names a binary (BENCHMARKS.md says how it was built).

Two scenarios, streamed ``/v1/chat/completions``, greedy, ``--max-tokens`` each:

- conversation: one client, ``--turns`` turns, each sending the whole chat so far (a short
  system prompt, every question and every answer) plus a new question; TTFT of turns 2 and on;
- shared system prompt: ``--clients`` clients at once, each a ``--system-tokens`` system prompt
  and its own question. Round 1 meets empty caches (every engine decodes it all); later rounds
  find the system prompt in the KV cache of the sequences the previous round used.

The engines take turns within each round; the report gives medians with min-max over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.servers import (  # needs the repo root on sys.path
    start_appliance,
    start_llama_server,
    write_bench_model,
)

# One request: (seconds to the first text, the answer's text, prompt tokens taken from the cache).
Chat = Callable[[list[dict[str, str]]], tuple[float, str, int]]


def chat_client(base_url: str, max_tokens: int) -> Chat:
    def chat(messages: list[dict[str, str]]) -> tuple[float, str, int]:
        body = {
            "model": "bench",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        cached = 0
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event: dict[str, Any] = json.loads(line.removeprefix("data: "))
                details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens", cached)
                for choice in event.get("choices", []):
                    if text := choice["delta"].get("content"):
                        first = first if first is not None else time.perf_counter() - sent
                        parts.append(text)
        return first or time.perf_counter() - sent, "".join(parts), cached

    return chat


def system_prompt(size: int) -> str:
    sentence = "You are a careful assistant for the appliance; answer in short plain sentences. "
    return (sentence * (size // len(sentence) + 1))[:size]


def conversation(chat: Chat, turns: int) -> tuple[list[float], list[int]]:
    """TTFT and cached tokens of turns 2 and on: each turn resends the chat so far."""
    messages = [{"role": "system", "content": system_prompt(200)}]
    ttfts, cached = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what comes next?"})
        ttft, answer, reused = chat(messages)
        messages.append({"role": "assistant", "content": answer})
        if turn:
            ttfts.append(ttft)
            cached.append(reused)
    return ttfts, cached


def shared_system_prompt(
    chat: Chat, clients: int, size: int, round_number: int
) -> tuple[list[float], list[int]]:
    system = system_prompt(size)

    def client(index: int) -> tuple[float, str, int]:
        question = f"Client {index}, round {round_number}: which step is next?"
        return chat([{"role": "system", "content": system}, {"role": "user", "content": question}])

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(client, range(clients)))
    return [ttft for ttft, _, _ in outcomes], [reused for _, _, reused in outcomes]


def appliance(
    model: Path, work: Path, args: argparse.Namespace, servers: contextlib.ExitStack, *, reuse: bool
) -> Chat:
    server = start_appliance(
        model,
        work,
        name="reuse" if reuse else "no-reuse",
        parallel=args.clients,
        context=args.context,
        threads=args.threads,
        env={"APPLIANCE_ENGINE__PROMPT_REUSE": "true" if reuse else "false"},
    )
    servers.callback(server.stop)
    return chat_client(server.url, args.max_tokens)


def llama_server(model: Path, work: Path, args: argparse.Namespace, servers: contextlib.ExitStack) -> Chat:
    server = start_llama_server(
        args.llama_server, model, work, slots=args.clients, context=args.context, threads=args.threads
    )
    servers.callback(server.stop)
    return chat_client(server.url, args.max_tokens)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--context", type=int, default=2048, help="context per sequence")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as servers:
        work = Path(scratch)
        model = work / "bench.gguf"
        write_bench_model(model, dim=args.dim, layers=args.layers)
        print(
            f"model: dim {args.dim}, {args.layers} layers, F16; {args.max_tokens} tokens per answer,"
            f" {args.threads} threads; load {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
            flush=True,
        )
        engines = {
            "reuse": appliance(model, work, args, servers, reuse=True),
            "no-reuse": appliance(model, work, args, servers, reuse=False),
        }
        if args.llama_server:
            engines["llama-server"] = llama_server(model, work, args, servers)
        for chat in engines.values():
            chat([{"role": "user", "content": "warm-up"}])

        turns: dict[str, list[float]] = {name: [] for name in engines}
        cold: dict[str, list[float]] = {name: [] for name in engines}
        warm: dict[str, list[float]] = {name: [] for name in engines}
        for round_number in range(1, args.rounds + 1):
            for name, chat in engines.items():
                ttfts, cached = conversation(chat, args.turns)
                turns[name].append(statistics.median(ttfts))
                print(
                    f"  round {round_number} {name:<12} conversation: TTFT {spread(ttfts)} ms,"
                    f" cached {cached}",
                    flush=True,
                )
            for name, chat in engines.items():
                # The same system prompt every round: round 1 meets it first, later rounds find it kept.
                ttfts, cached = shared_system_prompt(chat, args.clients, args.system_tokens, round_number)
                print(
                    f"  round {round_number} {name:<12} {args.clients} clients, shared system prompt:"
                    f" TTFT {spread(ttfts)} ms, cached {cached}",
                    flush=True,
                )
                (cold if round_number == 1 else warm)[name].append(statistics.median(ttfts))

    print("\nmedian TTFT in ms, median (min-max) over rounds")
    print(
        f"\n| engine | {args.turns}-turn chat, turns 2+ | {args.clients} clients, system prompt cold | warm |"
    )
    print("|---|---:|---:|---:|")
    for name in engines:
        warm_cell = spread(warm[name]) if warm[name] else "—"
        print(f"| {name} | {spread(turns[name])} | {spread(cold[name])} | {warm_cell} |")


if __name__ == "__main__":
    main()
