"""Start-up time of the built executable against the pip install, in the same run.

Run from the repo root after ``make dist`` (and, for the GPU build, ``make dist-gpu``):

    .venv/bin/python bench/startup.py [--rounds 10] [--models 10000] [--binary NAME=PATH ...]
        [--llama-server PATH]

Each round, every command takes its turn (so background load hits them alike), each with a fresh
copy of one data dir holding the tiny model and ``--models`` more registered models (made before
the clock starts; lists never open their files, so they are registered, not copied):

- exec ``serve`` → the first ``/healthz`` 200 (polled every 5 ms): what a supervisor waits for.
  The port answers liveness while the app is still being built (appliance/web/staged.py).
  Target: at most 0.5 s;
- exec ``serve`` → the first ``/v1/models`` 200: the app built and answering, what a script that
  calls the API waits for;
- exec ``serve`` → the first chat completion of 8 tokens: the same plus loading llama.cpp and
  the model;
- ``--help``: the wall time of the smallest command, which is what every CLI call pays. Target:
  at most 0.15 s.

``python`` (the venv's ``python -c pass``) is timed in each round too: the floor every Python
command stands on. Commands: ``pip`` (``.venv/bin/appliance``), ``dist``
(``dist/appliance/appliance``, when built), any ``--binary NAME=PATH`` more, and ``llama-server``
(llama.cpp's own, exec → ``/health`` 200 and first completion with the same model) when
``--llama-server`` names one. It prints the median and the min-max spread of each, each command's
medians relative to ``pip``, and the verdicts. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.audit import Context  # noqa: E402
from appliance.models.formats import read_capabilities  # noqa: E402
from appliance.runtime import Runtime  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from bench.lists import register  # noqa: E402
from bench.servers import precompile  # noqa: E402
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf  # noqa: E402

HELP_TARGET = 0.15
HEALTHZ_TARGET = 0.5

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@dataclass
class Timings:
    healthz: list[float] = field(default_factory=list)
    first_api: list[float] = field(default_factory=list)
    first_chat: list[float] = field(default_factory=list)
    help: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str, body: dict[str, object] | None = None) -> bool:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_for(url: str, process: subprocess.Popen[bytes], body: dict[str, object] | None = None) -> None:
    deadline = time.monotonic() + 60
    while not answers(url, body):
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited with status {process.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within 60 s")
        time.sleep(0.005)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def time_server(
    command: list[str], env: dict[str, str], health: str, port: int, log: Path, timings: Timings
) -> None:
    """Exec ``command``, then time its first 200 on ``health``, on ``/v1/models`` and its first
    chat completion."""
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
        try:
            wait_for(f"{base}{health}", process)
            timings.healthz.append(time.perf_counter() - started)
            wait_for(f"{base}/v1/models", process)
            timings.first_api.append(time.perf_counter() - started)
            wait_for(f"{base}/v1/chat/completions", process, CHAT)
            timings.first_chat.append(time.perf_counter() - started)
        finally:
            stop(process)


def make_data_dir(data_dir: Path, model: Path, models: int) -> None:
    """The data dir every round copies: the tiny model imported, ``models`` more registered."""
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        runtime.models.import_file(model, Context.cli(), name="tiny")
        register(runtime.store, 0, models, read_capabilities(model, "gguf"))
    finally:
        runtime.close()


def appliance_round(command: list[str], template: Path, work: Path, timings: Timings) -> None:
    shutil.copytree(template, work / "data")
    env = {**os.environ, "APPLIANCE_DATA_DIR": str(work / "data")}
    port = free_port()
    time_server([*command, "serve", "--port", str(port)], env, "/healthz", port, work / "serve.log", timings)
    started = time.perf_counter()
    subprocess.run([*command, "--help"], env=env, check=True, capture_output=True)
    timings.help.append(time.perf_counter() - started)


def llama_server_round(binary: Path, model: Path, work: Path, timings: Timings) -> None:
    port = free_port()
    command = [str(binary), "-m", str(model), "--port", str(port), "-c", "256", "--no-webui"]
    time_server(command, dict(os.environ), "/health", port, work / "llama-server.log", timings)


def python_round(timings: Timings) -> None:
    started = time.perf_counter()
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", "pass"], check=True)
    timings.help.append(time.perf_counter() - started)


def describe(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.3f} s ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", type=int, default=0, help="registered models beside the tiny one")
    parser.add_argument(
        "--binary", action="append", default=[], metavar="NAME=PATH", help="another executable"
    )
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    args = parser.parse_args()

    commands: dict[str, list[str]] = {"pip": [str(REPO / ".venv" / "bin" / "appliance")]}
    precompile(str(REPO / ".venv" / "bin" / "python"))
    built = REPO / "dist" / "appliance" / "appliance"
    if built.exists():
        commands["dist"] = [str(built)]
    for entry in args.binary:
        name, _, path = entry.partition("=")
        commands[name] = [str(Path(path).resolve())]
    results = {name: Timings() for name in commands}
    results["python"] = Timings()
    if args.llama_server is not None:
        results["llama-server"] = Timings()

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "tiny.gguf"
        write_llama_gguf(model, chat_template=TINY_CHAT_TEMPLATE)
        template = Path(scratch) / "data"
        make_data_dir(template, model, args.models)
        for round_number in range(args.rounds):
            python_round(results["python"])
            for name, command in commands.items():
                with tempfile.TemporaryDirectory(dir=scratch) as work:
                    appliance_round(command, template, Path(work), results[name])
            if args.llama_server is not None:
                with tempfile.TemporaryDirectory(dir=scratch) as work:
                    llama_server_round(args.llama_server, model, Path(work), results["llama-server"])
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)

    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"median (min-max) over {args.rounds} rounds, {args.models} more models, cpu_count={os.cpu_count()},"
    )
    print(f"load average at the end {load}")
    titles = ("exec → /healthz", "exec → /v1/models", "exec → first chat", "--help (python: -c pass)")
    print(f"{'command':<14} " + " ".join(f"{title:<26}" for title in titles))
    for name, timings in results.items():
        columns = (timings.healthz, timings.first_api, timings.first_chat, timings.help)
        print(f"{name:<14} " + " ".join(f"{describe(column):<26}" for column in columns))
    reference = results["pip"]
    for name, timings in results.items():
        if name in ("pip", "python") or not timings.healthz:
            continue
        ratios = [
            f"{label} {statistics.median(mine) / statistics.median(theirs):.2f}x"
            for label, mine, theirs in (
                ("healthz", timings.healthz, reference.healthz),
                ("/v1/models", timings.first_api, reference.first_api),
                ("first chat", timings.first_chat, reference.first_chat),
                ("--help", timings.help, reference.help),
            )
            if mine and theirs
        ]
        print(f"{name} / pip: " + ", ".join(ratios))
    for name, timings in results.items():
        if timings.healthz and name != "llama-server":
            for label, values, target in (
                ("exec → /healthz", timings.healthz, HEALTHZ_TARGET),
                ("--help", timings.help, HELP_TARGET),
            ):
                verdict = "PASS" if statistics.median(values) <= target else "MISS"
                print(f"{name}: {label} target {target} s: {verdict}")


if __name__ == "__main__":
    main()
