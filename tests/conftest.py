"""Fixtures: a temp data dir, settings, an open runtime, the tiny model, the CLI and a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf

APPLIANCE = [sys.executable, "-m", "appliance"]


def isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """No APPLIANCE_* variables, and the config and data dirs XDG names under ``root``."""
    for key in list(os.environ):
        if key.startswith("APPLIANCE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "xdg-data"))


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own config, data dir or APPLIANCE_* variables."""
    isolate(monkeypatch, tmp_path)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of a PostgreSQL schema of this test's own (tests/postgres.py); skips without PostgreSQL."""
    from tests.postgres import fresh_schema

    with fresh_schema() as url:
        yield url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    opened = Runtime.open(settings)
    yield opened
    opened.close()


@pytest.fixture
def context() -> Context:
    return Context(actor="test:user")


@pytest.fixture(scope="session")
def tiny_gguf_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny_gguf_master: Path) -> Path:
    """A private copy: a hard-link import makes its source read-only, so tests never share one."""
    copy = tmp_path / "src" / "tiny.gguf"
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(tiny_gguf_master.read_bytes())
    return copy


def import_file(data_dir: Path, path: Path, name: str | None = None) -> str:
    """``appliance models import PATH --name NAME``, by the same service in this process: a model a
    test needs, without a process's start-up (about a second each; the command's own tests run it).
    The imported model's full name."""
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        return str(runtime.models.import_file(path, Context.cli(), name=name).model.name)
    finally:
        runtime.close()


@pytest.fixture
def make_gguf(tmp_path: Path) -> object:
    """Write a distinct tiny GGUF (by seed) of roughly ``padding_bytes`` extra size."""

    def make(name: str, *, seed: int = 1, padding_bytes: int = 0) -> Path:
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        return write_llama_gguf(path, seed=seed, padding_bytes=padding_bytes)

    return make


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(data_dir: Path) -> object:
    """Run the real ``appliance`` command in a subprocess against the test's data dir."""

    def run(
        *args: str, env: dict[str, str] | None = None, timeout: float = 60, input: str | None = None
    ) -> CliResult:
        completed = subprocess.run(
            [*APPLIANCE, "--data-dir", str(data_dir), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    client: httpx.Client


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    """``appliance serve`` in its own process on a free loopback port."""
    with started_server(data_dir) as started:
        yield started


@contextmanager
def started_server(data_dir: Path, log: Path | None = None) -> Iterator[Server]:
    """``appliance serve`` on ``data_dir``, in its own process (with this process's environment).
    Its output goes to ``log`` where given: a server that answers many requests fills a pipe that
    nobody reads, and then stops mid-write."""
    port = free_port()
    with open(log, "w") if log else nullcontext(subprocess.PIPE) as output:
        process = subprocess.Popen(
            [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            said = log.read_text() if log else process.communicate()[0]
            raise RuntimeError(f"appliance serve did not start:\n{said}")
        time.sleep(0.1)
    yield Server(url=url, process=process, client=client)
    client.close()
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()
