"""Pull speed against curl and aria2c from a bandwidth-capped loopback server, in the same run.

Run from the repo root (aria2c comes from Debian's ``aria2`` package):

    .venv/bin/python bench/pull.py [--size-gib 1] [--rate-mb 40] [--repeat 3]
        [--appliance NAME=PYTHON ...]

It writes a GGUF file of ``--size-gib`` GiB and serves it from a separate process on loopback
with a cap of ``--rate-mb`` MB/s per connection (``sendfile`` in paced slices, so the server
costs little CPU). Then, taking turns ``--repeat`` times, it times to a fresh directory each time:

- ``appliance models pull URL`` (the real CLI: parallel Range parts, sha256, fsync, registry);
- ``curl -o`` (one stream: the cap itself);
- ``aria2c -x16 -s16`` (16 connections, no hashing, no fsync).

It prints the median seconds and MB/s of each, and the ratio of ours to aria2c (target: ours is
at least as fast). The exit status is 0 whatever the ratios.

``--appliance NAME=PYTHON`` (repeatable) measures other builds in the same run: PYTHON is the
interpreter of a venv with that build installed (``PYTHON -m appliance``). Each build takes its
turn in every round, and the report adds each build's ratios side by side and its speed
relative to the first build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1000 * 1000
SLICE = 256 * 1024


def serve(path: Path, port: int, rate: int) -> None:
    """The capped server (runs in its own process): GET with Range, paced sendfile."""
    size = path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def builds(entries: list[str] | None) -> dict[str, str]:
    """``NAME=PYTHON`` options as {name: interpreter}; this interpreter as ``appliance`` by default."""
    if not entries:
        return {"appliance": sys.executable}
    pairs = [entry.partition("=") for entry in entries]
    if any(not name or not python for name, _, python in pairs):
        raise SystemExit("--appliance takes NAME=PYTHON, e.g. before=../old/.venv/bin/python")
    return {name: python for name, _, python in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rate-mb", type=float, default=40.0, help="per-connection cap, MB/s")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--appliance", action="append", metavar="NAME=PYTHON", help="a build to measure")
    parser.add_argument("--serve", nargs=3, metavar=("PATH", "PORT", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), int(args.serve[2]))
        return
    pythons = builds(args.appliance)

    from tests.tiny_model import write_llama_gguf

    work = Path(tempfile.mkdtemp(prefix="pull-bench-", dir=args.workdir))
    source = write_llama_gguf(work / "model.gguf", padding_bytes=int(args.size_gib * (1 << 30)))
    size = source.stat().st_size
    port = free_port()
    rate = int(args.rate_mb * MB)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(source), str(port), str(rate)])
    url = f"http://127.0.0.1:{port}/model.gguf"
    aria2c = shutil.which("aria2c")
    print(f"file {size / (1 << 30):.2f} GiB; server caps each connection at {args.rate_mb:g} MB/s")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # -P: without it the current directory (this checkout) would shadow the build's package.
        pulls = {
            f"{name} models pull": [
                python,
                "-P",
                "-m",
                "appliance",
                "--data-dir",
                "OUT/data",
                "models",
                "pull",
                url,
            ]
            for name, python in pythons.items()
        }
        cases = {**pulls, "curl (1 stream)": ["curl", "-sS", "-o", "OUT/model.gguf", url]}
        if aria2c:
            aria2 = [aria2c, "-q", "-x16", "-s16", "-k1M", "--file-allocation=none", "-d", "OUT"]
            cases["aria2c -x16 -s16"] = [*aria2, "-o", "model.gguf", url]
        else:
            print("aria2c not found (apt-get install aria2); its row is left out")
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_number in range(1, args.repeat + 1):
            for name, command in cases.items():
                out = work / f"out-{round_number}-{len(times[name])}"
                out.mkdir()
                subprocess.run(["sync"], check=True)
                seconds = timed([str(out) + part[3:] if part.startswith("OUT") else part for part in command])
                times[name].append(seconds)
                print(f"  run {round_number}/{args.repeat} {name:24s} {seconds:6.2f}s")
                shutil.rmtree(out)
        print(f"\n{'tool':26s} {'median s':>9s} {'MB/s':>8s}  runs (s)")
        medians = {}
        for name, runs in times.items():
            medians[name] = statistics.median(runs)
            print(
                f"{name:26s} {medians[name]:9.2f} {size / MB / medians[name]:8.1f}  "
                + " ".join(f"{run:.2f}" for run in runs)
            )
        if len(pulls) == 1:
            ours = medians[next(iter(pulls))]
            if "aria2c -x16 -s16" in medians:
                ratio = medians["aria2c -x16 -s16"] / ours
                verdict = "PASS" if ratio >= 1 else "MISS"
                print(f"\nours / aria2c speed: {ratio:.2f}  {verdict} (target >= 1)")
            print(f"ours / curl speed: {medians['curl (1 stream)'] / ours:.2f}")
        else:
            compare(medians, list(pythons))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def compare(medians: dict[str, float], names: list[str]) -> None:
    """Each build's speed ratios side by side, then each build against the first one."""
    print("\n| speed ratio | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for reference in ("aria2c -x16 -s16", "curl (1 stream)"):
        if reference in medians:
            cells = " | ".join(f"{medians[reference] / medians[f'{n} models pull']:.2f}" for n in names)
            print(f"| / {reference} | {cells} |")
    first = medians[f"{names[0]} models pull"]
    for name in names[1:]:
        print(f"\n{name} / {names[0]} speed: {first / medians[f'{name} models pull']:.2f}")


if __name__ == "__main__":
    main()
