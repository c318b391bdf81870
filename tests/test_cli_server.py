"""CLI commands that start or reach the running server: addresses, ports and what they print."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import APPLIANCE, CliResult, Server, free_port, import_file


def test_ps_load_and_unload_reach_the_server_given_by_port(
    cli: object, server: Server, tiny_gguf: Path, data_dir: Path
) -> None:
    port = server.url.rsplit(":", 1)[1]
    import_file(data_dir, tiny_gguf)
    listed: CliResult = cli("ps", "--json", "--port", port)  # type: ignore[operator]
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {**json.loads(listed.stdout), "models": []}
    table: CliResult = cli("ps", "--host", "127.0.0.1", "--port", port)  # type: ignore[operator]
    assert table.returncode == 0, table.stderr
    assert "UNLOADS IN" in table.stdout
    unloaded: CliResult = cli("models", "unload", "tiny", "--port", port)  # type: ignore[operator]
    assert unloaded.returncode == 0, unloaded.stderr
    assert "tiny was not loaded" in unloaded.stdout
    missing: CliResult = cli("models", "load", "ghost", "--port", port)  # type: ignore[operator]
    assert missing.returncode == 1
    assert "model ghost:latest not found" in missing.stderr


@pytest.mark.parametrize("command", [["ps"], ["models", "load"], ["models", "unload"]])
def test_no_server_hint_names_options_the_command_takes(cli: object, command: list[str]) -> None:
    arguments = [] if command == ["ps"] else ["tiny"]
    result: CliResult = cli(*command, *arguments, "--port", str(free_port()))  # type: ignore[operator]
    assert result.returncode == 1
    assert "no appliance server answers at http://127.0.0.1:" in result.stderr
    assert "hint: start it with `appliance serve`, or pass the --host/--port" in result.stderr
    help_text: CliResult = cli(*command, "--help")  # type: ignore[operator]
    assert "--host" in help_text.stdout
    assert "--port" in help_text.stdout


def test_ps_on_ipv6_loopback_builds_a_bracketed_url(cli: object) -> None:
    result: CliResult = cli("ps", "--host", "::1", "--port", str(free_port()))  # type: ignore[operator]
    assert result.returncode == 1
    assert "no appliance server answers at http://[::1]:" in result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_serve_on_a_port_in_use_says_so(cli: object, taken_port: int) -> None:
    result: CliResult = cli("serve", "--port", str(taken_port))  # type: ignore[operator]
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{taken_port}: the port is in use" in result.stderr
    assert "hint: " in result.stderr
    assert "Errno" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("::1", "free", "http://[::1]:{port}"),
        ("[::1]", "free", "http://[::1]:{port}"),
        ("127.0.0.1", "0", "http://127.0.0.1:"),  # the port the system chose is printed and served
    ],
)
def test_serve_prints_a_url_that_works(data_dir: Path, host: str, port: str, url: str) -> None:
    if port == "free":
        port = str(free_port())
        url = url.format(port=port)
    process = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--host", host, "--port", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first_line = process.stderr.readline()
        assert f"serving on {url}" in first_line
        url = first_line.split("serving on ", 1)[1].split(" ", 1)[0]
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.1)
        served_port = url.rsplit(":", 1)[1]
        listed = subprocess.run(
            [*APPLIANCE, "--data-dir", str(data_dir), "ps", "--json", "--host", host, "--port", served_port],
            capture_output=True,
            text=True,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["models"] == []
    finally:
        process.terminate()
        process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()


def test_serve_listens_so_that_its_connections_send_small_writes_at_once() -> None:
    # uvicorn serves on the socket `serve` binds; asyncio turns Nagle off (TCP_NODELAY) on the
    # connections it accepts only when that socket says it is TCP. With Nagle on, each streamed
    # token after the first waits for the client's delayed ACK (40 ms on Linux).
    import asyncio

    from appliance.cli import _listen

    listener = _listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    seen: list[int] = []

    async def accept_one() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted: socket.socket = writer.get_extra_info("socket")
            seen.append(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.read()
            writer.close()

    asyncio.run(accept_one())
    assert len(seen) == 1
    assert seen[0] != 0
