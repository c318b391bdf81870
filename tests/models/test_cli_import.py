"""The ``models import`` command's choices (copy, link, replace) and reads on a full disk, in a subprocess."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from tests.conftest import APPLIANCE, CliResult
from tests.models.conftest import fill


def ok(result: CliResult) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_default_import_leaves_the_users_file_alone(cli: object, tiny_gguf: Path) -> None:
    mode = stat.S_IMODE(tiny_gguf.stat().st_mode)
    out = ok(cli("models", "import", str(tiny_gguf), "--name", "m", "--json"))  # type: ignore[operator]
    assert json.loads(out)["method"] in ("reflink", "copy")
    assert stat.S_IMODE(tiny_gguf.stat().st_mode) == mode


def test_link_hard_links_and_copy_with_link_is_refused(cli: object, tiny_gguf: Path) -> None:
    refused = cli("models", "import", str(tiny_gguf), "--copy", "--link")  # type: ignore[operator]
    assert refused.returncode == 2
    assert "--copy and --link contradict each other" in refused.stderr
    out = ok(cli("models", "import", str(tiny_gguf), "--name", "m", "--link", "--json"))  # type: ignore[operator]
    if json.loads(out)["method"] == "hardlink":
        assert stat.S_IMODE(tiny_gguf.stat().st_mode) == 0o444


def test_another_gguf_is_refused_then_replaced(cli: object, tiny_gguf: Path, make_gguf: object) -> None:
    ok(cli("models", "import", str(tiny_gguf), "--name", "m"))  # type: ignore[operator]
    other = make_gguf("other.gguf", seed=7)  # type: ignore[operator]
    refused = cli("models", "import", str(other), "--name", "m")  # type: ignore[operator]
    assert refused.returncode == 1
    assert "a model holds one gguf file" in refused.stderr
    assert "--replace" in refused.stderr
    replaced = json.loads(ok(cli("models", "import", str(other), "--name", "m", "--replace", "--json")))  # type: ignore[operator]
    shown = json.loads(ok(cli("models", "show", "m", "--json")))  # type: ignore[operator]
    assert [artifact["digest"] for artifact in shown["artifacts"]] == [replaced["digest"]]
    assert len(replaced["replaced"]) == 1


def test_reads_work_on_a_full_disk_and_writes_say_disk_full(
    small_disk: Path, tiny_gguf: Path, make_gguf: object
) -> None:
    def run(*args: str) -> CliResult:
        command = [*APPLIANCE, "--data-dir", str(small_disk / "data"), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return CliResult(done.returncode, done.stdout, done.stderr)

    ok(run("models", "import", str(tiny_gguf), "--name", "m"))
    other = make_gguf("other.gguf", seed=7)  # type: ignore[operator]
    fill(small_disk)
    assert [model["name"] for model in json.loads(ok(run("models", "ls", "--json")))] == ["m:latest"]
    assert json.loads(ok(run("models", "show", "m", "--json")))["name"] == "m:latest"
    assert [event["action"] for event in json.loads(ok(run("audit", "ls", "--json")))] == ["models.import"]
    assert json.loads(ok(run("downloads", "ls", "--json"))) == []
    for write in (("models", "pin", "m"), ("models", "import", str(other), "--name", "o")):
        failed = run(*write)
        assert failed.returncode == 1, failed.stderr
        assert "is full" in failed.stderr
        assert "hint: free disk space" in failed.stderr
        assert "Traceback" not in failed.stderr
    assert json.loads(ok(run("models", "show", "m", "--json")))["pinned"] is False
