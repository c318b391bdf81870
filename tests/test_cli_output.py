"""What the CLI prints from users and from the store is shown exactly as it is: never as Rich markup."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
from pathlib import Path

import pytest

from appliance.errors import InvalidModelRef
from appliance.settings import Settings
from appliance.store import open_store
from appliance.store.base import Download
from tests.conftest import APPLIANCE, CliResult

# Each would be a Rich markup tag, a broken one, or an emoji code if it were printed as markup.
# A pull from a port nothing listens on fails at its first try, not after its retries' backoff.
NO_RETRIES = {"APPLIANCE_MODELS__DOWNLOAD__RETRIES": "0"}
MARKUP = ["[/x]y.gguf", "[red]y.gguf", "[bold]x[/bold].gguf", ":smile:.gguf", "[link=http://a]b.gguf"]


def test_invalid_ref_prints_its_hint_exactly(cli: object) -> None:
    result: CliResult = cli("models", "pull", "hf:only-an-org")  # type: ignore[operator]
    assert result.returncode == 1
    assert "error: " in result.stderr
    assert f"hint: {InvalidModelRef.default_hint}\n" in result.stderr  # hf:org/repo[/file][@rev]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", MARKUP)
def test_a_path_is_printed_as_typed(cli: object, tmp_path: Path, name: str) -> None:
    missing = tmp_path / name
    result: CliResult = cli("models", "import", str(missing))  # type: ignore[operator]
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dotted_path_with_brackets_is_printed_as_typed(cli: object, tmp_path: Path) -> None:
    result = subprocess.run(
        [*APPLIANCE, "--data-dir", str(tmp_path / "data"), "models", "import", "./[/x]y.gguf"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert f"{tmp_path}/[/x]y.gguf" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("download_id", ["[/x]", "[red]abc"])
def test_an_id_is_printed_as_typed(cli: object, download_id: str) -> None:
    result: CliResult = cli("downloads", "approve", download_id)  # type: ignore[operator]
    assert result.returncode == 1
    assert download_id in result.stderr
    assert "Traceback" not in result.stderr


def test_stored_text_is_listed_as_stored(cli: object, tmp_path: Path) -> None:
    """A failed pull leaves a download row and audit events holding the ref; listing them shows it whole."""
    # Nothing listens on port 1, so the pull fails at once. Longer than any terminal: piped, it stays whole.
    ref = f"http://127.0.0.1:1/{'a' * 300}/[/x]/[red]y.gguf"
    pulled: CliResult = cli("models", "pull", ref, env=NO_RETRIES)  # type: ignore[operator]
    assert pulled.returncode == 1
    assert ref in pulled.stderr
    downloads: CliResult = cli("downloads", "ls")  # type: ignore[operator]
    assert downloads.returncode == 0, downloads.stderr
    assert ref in downloads.stdout
    missing = tmp_path / "[/x]" / "[red]z.gguf"
    assert cli("models", "import", str(missing)).returncode == 1  # type: ignore[operator]
    events = json.loads(cli("audit", "ls", "--json").stdout)  # type: ignore[operator]
    targets = {event["target"] for event in events}
    assert any(ref in target for target in targets), targets
    table: CliResult = cli("audit", "ls")  # type: ignore[operator]
    assert table.returncode == 0, table.stderr
    for target in targets:
        assert target in table.stdout


def run_on_a_terminal(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (so it draws progress); return its exit and stderr."""
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", "TERM": "xterm", **(env or {})},
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the process closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    returncode = process.wait(timeout=60)
    reader.join(timeout=60)
    os.close(main)
    return returncode, b"".join(chunks).decode(errors="replace")


def test_progress_shows_the_file_name_as_it_is(tmp_path: Path, tiny_gguf: Path) -> None:
    source = tmp_path / "[red]tiny.gguf"
    tiny_gguf.rename(source)
    returncode, output = run_on_a_terminal(
        [*APPLIANCE, "--data-dir", str(tmp_path / "data"), "models", "import", str(source), "--name", "t"],
        cwd=tmp_path,
    )
    assert returncode == 0, output
    assert "importing [red]tiny.gguf" in output


def test_pull_progress_shows_the_ref_as_it_is(tmp_path: Path) -> None:
    ref = "http://127.0.0.1:1/[/x]y.gguf"
    returncode, output = run_on_a_terminal(
        [*APPLIANCE, "--data-dir", str(tmp_path / "data"), "models", "pull", ref],
        cwd=tmp_path,
        env=NO_RETRIES,
    )
    assert returncode == 1
    assert "MarkupError" not in output
    assert f"pulling {ref}" in output


def test_control_characters_in_stored_text_are_shown_not_run(cli: object, data_dir: Path) -> None:
    """An error a remote server wrote (clear the screen, retitle the terminal) is listed as escapes."""
    hostile = "refused\x1b[2J\x1b]0;owned\x07\r"
    cli("downloads", "ls")  # type: ignore[operator]  # creates the data dir and its registry
    store = open_store(Settings(data_dir=data_dir))
    store.create_download(
        Download(id="d1", ref="https://h/x.gguf", state="failed", requested_by="test", error=hostile)
    )
    store.close()
    listed: CliResult = cli("downloads", "ls")  # type: ignore[operator]
    assert listed.returncode == 0, listed.stderr
    assert "refused\\x1b[2J\\x1b]0;owned\\x07\\x0d" in listed.stdout
    assert not any(ord(char) < 0x20 and char not in "\n" for char in listed.stdout)
    assert json.loads(cli("downloads", "ls", "--json").stdout)[0]["error"] == hostile  # type: ignore[operator]
