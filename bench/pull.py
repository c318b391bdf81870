"""Pull speed and CPU against curl and aria2c from a bandwidth-capped loopback server, in the same run.

Run from the repo root (Debian packages: ``nginx``, ``aria2``, ``curl``):

    .venv/bin/python bench/pull.py [--size-gib 1] [--rate-mib 40] [--repeat 3]
        [--server nginx|builtin] [--skip curl|aria2c|aria2c-checked|tiny] [--appliance NAME=PYTHON ...]

It writes a GGUF file of ``--size-gib`` GiB and serves it on loopback, capping each connection at
``--rate-mib`` MiB/s. The default server is Debian's nginx (``limit_rate 40m`` per connection,
``sendfile``, access log off), the reference an outside check measured against;
``--server builtin`` is a small Python server of our own (``sendfile`` in paced slices). Then,
taking turns ``--repeat`` times, it runs each tool into a fresh directory:

- ``appliance models pull URL`` (the real CLI: parallel Range parts, sha256, fsync, registry);
- ``appliance models pull`` of a 1 MiB file from the same server: the CLI's start-up and
  bookkeeping, so that what the transfer itself costs is the difference;
- ``curl -o`` (one stream: the cap itself);
- ``aria2c -x16 -s16`` (16 connections, no hashing, no fsync): the reference of the targets;
- the same with ``--checksum=sha-256=...``: aria2c verifying what it fetched, as a pull does (it
  reads the file back once it has it all), reported beside the targets as the like-for-like ratio;
- ``openssl dgst -sha256`` of the served file (in the page cache, as a pull's read-back is): what
  the sha-256 alone costs. aria2c's CPU plus this, per round, is what aria2c would cost if it also
  named its file by its sha-256, as a pull must (the hashing floor); a pull's CPU is reported
  against it too.

For every run it prints the seconds and the CPU-seconds the tool used (user + sys of the child
and its children, from ``os.wait4``), and CPU-seconds per GiB. The summary gives the median and
the min-max spread over rounds, the ratios ours / aria2c for time and CPU, per round and of the
medians, and PASS/MISS against the targets: time <= aria2c's, CPU <= 1.5x aria2c's. Then, since
aria2c neither fsyncs nor hashes, two like-for-like views: each run is followed by a timed `sync`
(seconds until the file is on disk) while the whole machine's busy CPU-seconds are counted from
``/proc/stat`` (nginx's and the kernel's writeback threads' too, which a process's own figures
leave out), and the ratios against aria2c verifying a sha-256. The exit status is 0 whatever the
ratios.

``--appliance NAME=PYTHON`` (repeatable) measures other builds in the same run: PYTHON is the
interpreter of a venv with that build installed (``PYTHON -m appliance``). Each build takes its
turn in every round, and each gets its own ratios against aria2c.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import precompile, start_nginx

MIB = 1024 * 1024
GIB = 1 << 30
SLICE = 256 * 1024
ARIA2C = "aria2c -x16 -s16"
ARIA2C_CHECKED = "aria2c + sha-256 check"
OPENSSL = "openssl sha-256 of the file"
CURL = "curl (1 stream)"
TIME_TARGET = 1.0  # ours / aria2c, seconds
CPU_TARGET = 1.5  # ours / aria2c, CPU-seconds


def serve(root: Path, port: int, rate: int) -> None:
    """The built-in capped server (runs in its own process): GET with Range, paced sendfile."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = root / self.path.lstrip("/")
            size = path.stat().st_size
            start, end = 0, size - 1
            status = 200
            header = self.headers.get("Range", "")
            if header.startswith("bytes="):
                first, _, last = header[6:].partition("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", '"bench"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            self.wfile.flush()
            began = time.monotonic()
            sent = 0
            with path.open("rb") as source:
                while start + sent <= end:
                    count = min(SLICE, end + 1 - start - sent)
                    try:
                        sent += os.sendfile(self.connection.fileno(), source.fileno(), start + sent, count)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client closing its idle keep-alive connection is not news

    server = Server(("127.0.0.1", port), Handler)
    server.serve_forever()


def start_server(kind: str, root: Path, port: int, rate: int) -> subprocess.Popen[bytes]:
    """nginx (``user root`` because it serves a 0700 temp dir; ignored when not root) or ours."""
    if kind == "builtin":
        return subprocess.Popen([sys.executable, __file__, "--serve", str(root), str(port), str(rate)])
    return start_nginx(root, root.parent / "nginx", port, rate=rate)  # beside the served files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu: float  # user + sys of the child and its children
    durable: float  # seconds until the file is on disk: the command, then `sync`
    machine_cpu: float  # CPU-seconds of the whole machine meanwhile: nginx and the kernel's writeback too


def machine_busy() -> float:
    """CPU-seconds every CPU has spent busy since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed(command: list[str]) -> Run:
    """Wall seconds and CPU-seconds (user + sys, from the child's resource usage) of one command;
    then, with a `sync` after it, the seconds until its file is on disk and the machine's CPU-seconds
    meanwhile. A tool that does not fsync leaves its writeback to the kernel's threads, which its
    own figures do not count: aria2c's file is still in the page cache when it exits."""
    busy = machine_busy()
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {child.returncode}")
    subprocess.run(["sync"], check=True)
    durable = time.perf_counter() - started
    return Run(seconds, usage.ru_utime + usage.ru_stime, durable, machine_busy() - busy)


def builds(entries: list[str] | None) -> dict[str, str]:
    """``NAME=PYTHON`` options as {name: interpreter}; this interpreter as ``appliance`` by default."""
    if not entries:
        return {"appliance": sys.executable}
    pairs = [entry.partition("=") for entry in entries]
    if any(not name or not python for name, _, python in pairs):
        raise SystemExit("--appliance takes NAME=PYTHON, e.g. before=../old/.venv/bin/python")
    return {name: python for name, _, python in pairs}


def wait_for(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server on port {port} did not start") from None
            time.sleep(0.05)


def median_seconds(runs: list[Run]) -> float:
    return statistics.median(run.seconds for run in runs)


def median_cpu(runs: list[Run]) -> float:
    return statistics.median(run.cpu for run in runs)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rate-mib", type=float, default=40.0, help="per-connection cap, MiB/s")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", choices=("nginx", "builtin"), default="nginx")
    parser.add_argument(
        "--skip",
        action="append",
        choices=("curl", "aria2c", "aria2c-checked", "openssl", "tiny"),
        default=[],
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--appliance", action="append", metavar="NAME=PYTHON", help="a build to measure")
    parser.add_argument("--serve", nargs=3, metavar=("ROOT", "PORT", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), int(args.serve[2]))
        return
    pythons = builds(args.appliance)
    for python in pythons.values():
        precompile(python)

    from tests.tiny_model import write_llama_gguf

    work = Path(tempfile.mkdtemp(prefix="pull-bench-", dir=args.workdir))
    root = work / "www"
    root.mkdir()
    source = write_llama_gguf(root / "model.gguf", padding_bytes=int(args.size_gib * GIB))
    write_llama_gguf(root / "tiny.gguf", padding_bytes=MIB)
    size = source.stat().st_size
    gib = size / GIB
    port = free_port()
    rate = int(args.rate_mib * MIB)
    server = start_server(args.server, root, port, rate)
    url = f"http://127.0.0.1:{port}/model.gguf"
    print(f"file {gib:.2f} GiB; {args.server} server caps each connection at {args.rate_mib:g} MiB/s")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        wait_for(port, server)

        def pull(python: str, target: str) -> list[str]:
            # -P: without it the current directory (this checkout) would shadow the build's package.
            return [python, "-P", "-m", "appliance", "--data-dir", "OUT/data", "models", "pull", target]

        cases = {f"{name} models pull": pull(python, url) for name, python in pythons.items()}
        if "tiny" not in args.skip:
            tiny = url.replace("model.gguf", "tiny.gguf")
            cases.update({f"{name} pull 1 MiB": pull(python, tiny) for name, python in pythons.items()})
        if "curl" not in args.skip:
            cases[CURL] = ["curl", "-sS", "-o", "OUT/model.gguf", url]
        aria2c = shutil.which("aria2c")
        if aria2c and "aria2c" not in args.skip:
            aria2 = [aria2c, "-q", "-x16", "-s16", "-k1M", "--file-allocation=none", "-d", "OUT"]
            cases[ARIA2C] = [*aria2, "-o", "model.gguf", url]
            if "aria2c-checked" not in args.skip:
                digest = hashlib.sha256()
                with source.open("rb") as handle:
                    while block := handle.read(8 * MIB):
                        digest.update(block)
                checksum = f"--checksum=sha-256={digest.hexdigest()}"
                cases[ARIA2C_CHECKED] = [*aria2, checksum, "-o", "model.gguf", url]
        elif not aria2c:
            print("aria2c not found (apt-get install aria2); its row and the ratios are left out")
        openssl = shutil.which("openssl")
        if openssl and "openssl" not in args.skip:
            cases[OPENSSL] = [openssl, "dgst", "-sha256", str(source)]
        runs: dict[str, list[Run]] = {name: [] for name in cases}
        for round_number in range(1, args.repeat + 1):
            for name, command in cases.items():
                out = work / f"out-{round_number}-{len(runs[name])}"
                out.mkdir()
                subprocess.run(["sync"], check=True)
                placed = [str(out) + part[3:] if part.startswith("OUT") else part for part in command]
                run = timed(placed)
                runs[name].append(run)
                per_gib = "" if "1 MiB" in name else f" {run.cpu / gib:5.2f} CPU-s/GiB"
                where = f"{round_number}/{args.repeat}"
                print(
                    f"  run {where} {name:26s} {run.seconds:6.2f} s {run.cpu:6.2f} CPU-s{per_gib};"
                    f" on disk {run.durable:6.2f} s, machine {run.machine_cpu:6.2f} CPU-s"
                )
                shutil.rmtree(out)
        report(runs, list(pythons), gib)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, list[Run]], names: list[str], gib: float) -> None:
    """Medians and spreads per tool, then each build's ratios to aria2c (per round and of the medians)."""
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| tool | median s | s min-max | median CPU-s | CPU-s min-max | CPU-s/GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, done in runs.items():
        seconds = [run.seconds for run in done]
        cpu = [run.cpu for run in done]
        per_gib = "" if "1 MiB" in name else f"{statistics.median(cpu) / gib:.2f}"
        print(
            f"| {name} | {statistics.median(seconds):.2f} | {spread(seconds)} | {statistics.median(cpu):.2f}"
            f" | {spread(cpu)} | {per_gib} |"
        )
    if ARIA2C not in runs:
        return
    reference = runs[ARIA2C]
    print("\n| ours / aria2c | time, per round | time, medians | CPU, per round | CPU, medians | verdict |")
    print("|---|---|---:|---|---:|---|")
    for name in names:
        ours = runs[f"{name} models pull"]
        time_rounds = [mine.seconds / theirs.seconds for mine, theirs in zip(ours, reference, strict=True)]
        cpu_rounds = [mine.cpu / theirs.cpu for mine, theirs in zip(ours, reference, strict=True)]
        time_ratio = median_seconds(ours) / median_seconds(reference)
        cpu_ratio = median_cpu(ours) / median_cpu(reference)
        verdict = (
            f"time {'PASS' if time_ratio <= TIME_TARGET else 'MISS'} (<= {TIME_TARGET:g}),"
            f" CPU {'PASS' if cpu_ratio <= CPU_TARGET else 'MISS'} (<= {CPU_TARGET:g})"
        )
        print(
            f"| {name} | {' '.join(f'{r:.2f}' for r in time_rounds)} | {time_ratio:.2f}"
            f" | {' '.join(f'{r:.2f}' for r in cpu_rounds)} | {cpu_ratio:.2f} | {verdict} |"
        )
    print("\nOn disk (each command, then `sync`) and the whole machine's CPU-seconds meanwhile:")
    print("| tool | median s | s min-max | median machine CPU-s | min-max |")
    print("|---|---:|---:|---:|---:|")
    for name, done in runs.items():
        durable = [run.durable for run in done]
        machine = [run.machine_cpu for run in done]
        print(
            f"| {name} | {statistics.median(durable):.2f} | {spread(durable)}"
            f" | {statistics.median(machine):.2f} | {spread(machine)} |"
        )
    for name in names:
        ours = runs[f"{name} models pull"]
        time_rounds = [mine.durable / theirs.durable for mine, theirs in zip(ours, reference, strict=True)]
        cpu_rounds = [
            mine.machine_cpu / theirs.machine_cpu for mine, theirs in zip(ours, reference, strict=True)
        ]
        print(
            f"{name} / aria2c, on disk: time per round {' '.join(f'{r:.2f}' for r in time_rounds)},"
            f" machine CPU per round {' '.join(f'{r:.2f}' for r in cpu_rounds)}"
        )
    checked = runs.get(ARIA2C_CHECKED)
    for name in names if checked else []:
        ours = runs[f"{name} models pull"]
        time_rounds = [mine.seconds / theirs.seconds for mine, theirs in zip(ours, checked, strict=True)]
        cpu_rounds = [mine.cpu / theirs.cpu for mine, theirs in zip(ours, checked, strict=True)]
        print(
            f"{name} / aria2c verifying its sha-256 (both hash): time per round"
            f" {' '.join(f'{r:.2f}' for r in time_rounds)},"
            f" CPU per round {' '.join(f'{r:.2f}' for r in cpu_rounds)}"
        )
    hashed = runs.get(OPENSSL)
    if hashed:
        floor = [aria.cpu + digest.cpu for aria, digest in zip(reference, hashed, strict=True)]
        floor_rounds = [least / aria.cpu for least, aria in zip(floor, reference, strict=True)]
        floor_ratio = statistics.median(floor_rounds)
        print(
            f"The hashing floor (aria2c's CPU + openssl's sha-256 of the same bytes, per round):"
            f" {' '.join(f'{value:.2f}' for value in floor)} CPU-s, that is"
            f" {' '.join(f'{r:.2f}' for r in floor_rounds)}x aria2c's (median {floor_ratio:.2f}x):"
            f" aria2c itself, hashing what it fetched, would"
            f" {'meet' if floor_ratio <= CPU_TARGET else 'miss'} the CPU target ({CPU_TARGET:g}x)"
        )
        for name in names:
            ours = runs[f"{name} models pull"]
            rounds = [mine.cpu / least for mine, least in zip(ours, floor, strict=True)]
            print(
                f"{name} / the hashing floor: CPU per round {' '.join(f'{r:.2f}' for r in rounds)},"
                f" of the medians {median_cpu(ours) / statistics.median(floor):.2f}"
            )
    for name in names:
        tiny = runs.get(f"{name} pull 1 MiB")
        if tiny:
            whole = runs[f"{name} models pull"]
            transfer_s = median_seconds(whole) - median_seconds(tiny)
            transfer_cpu = median_cpu(whole) - median_cpu(tiny)
            print(
                f"{name}: start-up and bookkeeping (a 1 MiB pull) {median_seconds(tiny):.2f} s,"
                f" {median_cpu(tiny):.2f} CPU-s; the transfer itself about {transfer_s:.2f} s,"
                f" {transfer_cpu / gib:.2f} CPU-s/GiB"
            )


if __name__ == "__main__":
    main()
