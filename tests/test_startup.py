"""What a command loads before it does anything: every call of the CLI pays for it, `--help`
included (bench/startup.py times it; this keeps the heavy libraries out)."""

from __future__ import annotations

import subprocess
import sys

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
