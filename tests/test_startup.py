"""What a command loads before it does anything: every call of the CLI pays for it, `--help`
included (bench/startup.py times it; this keeps the heavy libraries out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = {
    "rich",
    "pydantic",
    "pydantic_settings",
    "litestar",
    "httpx",
    "apsw",
    "llama_cpp",
    "uvicorn",
    "cryptography",
}

# Runs the CLI as `appliance ARGS`, then writes the top-level modules it loaded to stderr.
LOADED = """
import sys
from pathlib import Path
from appliance.cli import cli
try:
    cli(prog_name="appliance", args=sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted({name.partition(".")[0] for name in sys.modules})), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["models", "--help"], ["serve", "--help"], ["users", "--help"], ["tasks", "--help"]]
)
def test_help_loads_none_of_the_heavy_libraries(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *args], capture_output=True, text=True, check=True, timeout=60
    )
    assert "Usage: appliance" in done.stdout
    heavy = HEAVY & set(done.stderr.split())
    assert not heavy, f"`appliance {' '.join(args)}` loaded {sorted(heavy)}"


def test_a_command_on_the_sqlite_store_loads_no_postgresql_driver(tmp_path: Path) -> None:
    """`models ls` (and a pull, an import...) opens the runtime on SQLite: the PostgreSQL driver and
    sqlite_utils (for `db` commands) are about 0.2 s of every such command's start."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED, "--data-dir", str(tmp_path), "models", "ls"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = set(done.stderr.split())
    assert "apsw" in loaded  # it did open the store
    assert not {"psycopg", "psycopg_pool", "sqlite_utils"} & loaded


def test_the_web_app_loads_the_mcp_sdk_only_when_the_gateway_is_first_called() -> None:
    """The SDK and what it brings take about 0.35 s to import, which every `serve` would pay before
    answering; the gateway starts it on its first call instead (tests/mcp call it)."""
    loads = "import sys, appliance.web.app; print('mcp' in sys.modules, 'starlette' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", loads], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"]
