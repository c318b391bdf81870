"""The model and the servers the benchmarks start: the random-weight GGUF they all serve,
``appliance serve`` (a build's interpreter, with its engine settings), llama.cpp's ``llama-server``
and nginx (the file server the pull and cluster benchmarks measure against), each on a free
loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf  # the scripts put the repo root on sys.path

__all__ = [
    "Server",
    "free_port",
    "precompile",
    "start",
    "start_appliance",
    "start_llama_server",
    "start_nginx",
    "write_bench_model",
]


def write_bench_model(path: Path, *, dim: int, layers: int) -> None:
    """A random-weight F16 llama GGUF of ``dim`` and ``layers``, a 32k vocabulary, the test chat template."""
    write_llama_gguf(
        path,
        dim=dim,
        layers=layers,
        heads=dim // 64,
        feed_forward=dim * 11 // 4,
        context=4096,
        vocab_size=32_000,
        f16=True,
        chat_template=TINY_CHAT_TEMPLATE,
        name="bench",
    )


def precompile(python: str) -> None:
    """Write the bytecode of the ``appliance`` package that ``python`` imports, as ``pip install``
    does for a wheel. An editable install has none, and where PYTHONDONTWRITEBYTECODE is set (this
    machine sets it) every run compiled each module again: about 0.2 s of each command's start."""
    script = "import appliance, compileall, os; compileall.compile_dir(os.path.dirname(appliance.__file__))"
    subprocess.run([python, "-P", "-c", script], check=True, stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str  # the base URL, http://127.0.0.1:PORT

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def start(command: list[str], env: dict[str, str], url: str, ready_path: str, log: Path) -> Server:
    """``command``, its output in ``log``, once ``url`` + ``ready_path`` answers."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_until_up(url + ready_path, process, log)
    return Server(process, url)


def start_appliance(
    model: Path,
    work: Path,
    *,
    name: str,
    python: str = sys.executable,
    parallel: int,
    context: int,
    threads: int,
    env: dict[str, str] | None = None,
) -> Server:
    """``appliance serve`` of the build ``python`` runs, with its own data directory in ``work``
    and ``model`` imported as "bench"; ``env`` adds settings."""
    port = free_port()
    environment = {
        **os.environ,
        "APPLIANCE_DATA_DIR": str(work / f"{name}-data"),
        "APPLIANCE_ENGINE__PARALLEL": str(parallel),
        "APPLIANCE_ENGINE__CONTEXT_LENGTH": str(context),
        "APPLIANCE_ENGINE__THREADS": str(threads),
        **(env or {}),
    }
    appliance = [python, "-P", "-m", "appliance"]  # -P: this checkout must not shadow the build
    subprocess.run(
        [*appliance, "models", "import", str(model), "--name", "bench"], env=environment, check=True
    )
    command = [*appliance, "serve", "--port", str(port)]
    return start(command, environment, f"http://127.0.0.1:{port}", "/healthz", work / f"{name}.log")


def start_llama_server(
    binary: Path, model: Path, work: Path, *, slots: int, context: int, threads: int
) -> Server:
    """llama.cpp's C++ server with ``slots`` parallel sequences of ``context`` tokens, as "bench"."""
    port = free_port()
    command = [
        str(binary),
        *("--model", str(model), "--alias", "bench", "--host", "127.0.0.1", "--port", str(port)),
        *("--ctx-size", str(context * slots), "--parallel", str(slots), "--jinja"),
        *("--threads", str(threads), "--threads-batch", str(threads), "--n-gpu-layers", "99"),
    ]
    return start(command, dict(os.environ), f"http://127.0.0.1:{port}", "/health", work / "llama-server.log")


NGINX_CONF = """\
daemon off;
worker_processes auto;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {limit}
    }}
}}
"""


def start_nginx(root: Path, prefix: Path, port: int, *, rate: str | None = None) -> subprocess.Popen[bytes]:
    """nginx serving ``root`` (sendfile) on ``port``, its own files under ``prefix`` (made here),
    each connection capped at ``rate`` (nginx's ``limit_rate``, e.g. ``40m``) when given."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    limit = f"limit_rate {rate};" if rate is not None else ""
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root, limit=limit))
    return subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.DEVNULL)
