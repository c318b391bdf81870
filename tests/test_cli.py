"""The ``appliance`` command, run as a real process against a temp data dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import APPLIANCE, CliResult


def as_json(result: CliResult) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_clean_failure(result: CliResult, message: str, cli: object) -> None:
    """Non-zero exit, a one-line error and a hint, no traceback, and nothing left behind."""
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr or message in result.stderr, result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert as_json(cli("models", "ls", "--json")) == []  # type: ignore[operator]


def test_import_prints_name_and_digest_then_ls_show_rm(cli: object, tiny_gguf: Path) -> None:
    result = cli("models", "import", str(tiny_gguf), "--name", "tiny:1")  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported tiny:1 sha256:")
    listed = as_json(cli("models", "ls", "--json"))  # type: ignore[operator]
    assert [model["name"] for model in listed] == ["tiny:1"]  # type: ignore[index, union-attr]
    table = cli("models", "ls")  # type: ignore[operator]
    assert "tiny:1" in table.stdout
    assert "ALL_F32" in table.stdout
    shown = as_json(cli("models", "show", "tiny:1", "--json"))  # type: ignore[operator]
    assert shown["capabilities"]["context_length"] == 256  # type: ignore[index]
    assert "context_length:" in cli("models", "show", "tiny:1").stdout  # type: ignore[operator]
    removed = cli("models", "rm", "tiny:1")  # type: ignore[operator]
    assert removed.returncode == 0
    assert "removed tiny:1" in removed.stdout
    assert as_json(cli("models", "ls", "--json")) == []  # type: ignore[operator]


def test_import_json_pin_unpin_gc_and_audit(cli: object, tiny_gguf: Path) -> None:
    imported = as_json(cli("models", "import", str(tiny_gguf), "--copy", "--json"))  # type: ignore[operator]
    assert imported["method"] == "copy"
    assert imported["model"]["name"] == "tiny:latest"
    assert "pinned tiny:latest" in cli("models", "pin", "tiny").stdout  # type: ignore[operator]
    assert as_json(cli("models", "show", "tiny", "--json"))["pinned"] is True  # type: ignore[index, operator]
    assert "unpinned tiny:latest" in cli("models", "unpin", "tiny").stdout  # type: ignore[operator]
    gc = as_json(cli("models", "gc", "--json"))  # type: ignore[operator]
    assert gc["orphan_blobs"] == 0  # type: ignore[index]
    events = as_json(cli("audit", "ls", "--json", "--action", "models.import"))  # type: ignore[operator]
    assert [event["target"] for event in events] == ["tiny:latest"]  # type: ignore[index, union-attr]
    assert events[0]["actor"].startswith("cli:")  # type: ignore[index]
    assert "models.pin" in cli("audit", "ls").stdout  # type: ignore[operator]


def test_verify_fails_and_quarantines_a_corrupted_blob(cli: object, tiny_gguf: Path, data_dir: Path) -> None:
    digest = as_json(cli("models", "import", str(tiny_gguf), "--copy", "--json"))["digest"]  # type: ignore[index, operator]
    assert cli("models", "verify").returncode == 0  # type: ignore[operator]
    blob = data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    result = cli("models", "verify")  # type: ignore[operator]
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert "quarantine" in result.stdout
    assert "error: verification failed" in result.stderr
    assert not blob.exists()


def test_missing_path(cli: object, tmp_path: Path) -> None:
    result = cli("models", "import", str(tmp_path / "nope.gguf"))  # type: ignore[operator]
    assert_clean_failure(result, "does not exist", cli)


def test_directory(cli: object, tmp_path: Path) -> None:
    assert_clean_failure(cli("models", "import", str(tmp_path)), "is a directory", cli)  # type: ignore[operator]


def test_wrong_format(cli: object, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("just some text, not a model\n")
    result = cli("models", "import", str(text), "--format", "gguf")  # type: ignore[operator]
    assert_clean_failure(result, "is not a GGUF file", cli)


def test_bad_name(cli: object, tiny_gguf: Path) -> None:
    result = cli("models", "import", str(tiny_gguf), "--name", "no spaces allowed")  # type: ignore[operator]
    assert_clean_failure(result, "invalid model name", cli)


def test_unknown_model(cli: object) -> None:
    result = cli("models", "show", "ghost")  # type: ignore[operator]
    assert result.returncode == 1
    assert "model ghost:latest not found" in result.stderr


# Root passes every file-mode check through two capabilities; without them it meets the modes as an
# ordinary owner would. Staying root (unlike switching to another user) keeps the checkout, its .venv
# and pytest's private temp dirs reachable wherever they are.
IGNORE_FILE_MODES = "-dac_override,-dac_read_search"


def run_without_root_file_access(
    command: list[str], *, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` so that file modes apply to it, even when the tests run as root."""
    if os.geteuid() == 0:
        drop = f"--inh-caps={IGNORE_FILE_MODES}", f"--bounding-set={IGNORE_FILE_MODES}"
        command = ["setpriv", *drop, *command]
    return subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=cwd, env={**os.environ, **env}
    )


def test_a_command_run_that_way_meets_file_modes(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.write_text("secret")
    locked.chmod(0o000)
    result = run_without_root_file_access(["cat", str(locked)], cwd=tmp_path, env={})
    assert result.returncode != 0
    assert "Permission denied" in result.stderr


def test_unreadable_file(tmp_path: Path, tiny_gguf: Path) -> None:
    secret = tmp_path / "secret.gguf"
    shutil.copy(tiny_gguf, secret)
    secret.chmod(0o000)
    data = tmp_path / "data"
    result = run_without_root_file_access(
        [*APPLIANCE, "--data-dir", str(data), "models", "import", str(secret)],
        cwd=tmp_path,
        env={"XDG_CONFIG_HOME": str(tmp_path / "config")},
    )
    assert result.returncode == 1
    assert "cannot be read: permission denied" in result.stderr
    assert "hint:" in result.stderr
    assert list((data / "blobs" / "sha256").iterdir()) == []
    assert list((data / "tmp").iterdir()) == []


def test_unreachable_config_dir(tmp_path: Path) -> None:
    locked = tmp_path / "config"
    locked.mkdir(mode=0o000)
    result = run_without_root_file_access(
        [*APPLIANCE, "--data-dir", str(tmp_path / "data"), "models", "ls"],
        cwd=tmp_path,
        env={"XDG_CONFIG_HOME": str(locked)},
    )
    locked.chmod(0o755)
    assert result.returncode == 1
    assert "cannot look for the config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_full_disk(tmp_path: Path, tiny_gguf: Path, make_gguf: object) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        big = make_gguf("big.gguf", padding_bytes=2 * 1024 * 1024)  # type: ignore[operator]
        command = [*APPLIANCE, "--data-dir", str(small / "data"), "models"]
        result = subprocess.run([*command, "import", str(big)], capture_output=True, text=True, check=False)
        assert result.returncode == 1
        assert "not enough space" in result.stderr
        assert "hint:" in result.stderr
        listed = subprocess.run([*command, "ls", "--json"], capture_output=True, text=True, check=True)
        assert json.loads(listed.stdout) == []
        assert list((small / "data" / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_two_processes_importing_one_file_make_one_blob(
    cli: object, make_gguf: object, data_dir: Path
) -> None:
    source = make_gguf("shared.gguf", padding_bytes=64 * 1024 * 1024)  # type: ignore[operator]
    command = [
        *APPLIANCE,
        "--data-dir",
        str(data_dir),
        "models",
        "import",
        str(source),
        "--copy",
        "--name",
        "shared",
    ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    digests = {out.split()[-4] for out, _ in outputs}
    assert len(digests) == 1
    assert len(list((data_dir / "blobs" / "sha256").iterdir())) == 1
    assert [model["name"] for model in as_json(cli("models", "ls", "--json"))] == ["shared:latest"]  # type: ignore[index, union-attr, operator]
    assert list((data_dir / "tmp").iterdir()) == []


KILLED_IMPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from appliance.audit import Context
    from appliance.runtime import Runtime
    from appliance.settings import Settings

    data_dir, source, marker = (Path(arg) for arg in sys.argv[1:4])

    def stall(done: int) -> None:
        marker.write_text(str(done))  # halfway: some bytes are in the partial file
        time.sleep(600)

    runtime = Runtime.open(Settings(data_dir=data_dir))
    runtime.models.import_file(
        source, Context(actor="test"), name="killed", allow_link=False, on_progress=stall
    )
    """
)


@pytest.mark.parametrize("allow_link", [False, True])
def test_sigkill_halfway_leaves_no_visible_blob_and_gc_cleans_up(
    cli: object, make_gguf: object, data_dir: Path, tmp_path: Path, allow_link: bool
) -> None:
    source = make_gguf("big.gguf", padding_bytes=32 * 1024 * 1024)  # type: ignore[operator]
    script = tmp_path / "killed_import.py"
    options = f"allow_link={allow_link}, hard_link={allow_link}"  # True: the asked-for hard link
    script.write_text(KILLED_IMPORT.replace("allow_link=False", options))
    marker = tmp_path / "marker"
    process = subprocess.Popen([sys.executable, str(script), str(data_dir), str(source), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, "the import ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert list((data_dir / "blobs" / "sha256").iterdir()) == []
    leftovers = list((data_dir / "tmp").iterdir())
    assert len(leftovers) == 1  # the partial (or link) the killed import was writing
    assert as_json(cli("models", "ls", "--json")) == []  # type: ignore[operator]
    gc = as_json(cli("models", "gc", "--json"))  # type: ignore[operator]
    assert gc["stale_partials"] == 1  # type: ignore[index]
    assert list((data_dir / "tmp").iterdir()) == []
    assert source.exists()  # collecting a hard link never touches the user's file
    # And the same import now succeeds from scratch.
    retry = cli("models", "import", str(source), "--name", "killed")  # type: ignore[operator]
    assert retry.returncode == 0, retry.stderr


def test_version_and_help_describe_every_command(cli: object) -> None:
    assert cli("--version").stdout.startswith("appliance, version")  # type: ignore[operator]
    help_text = cli("models", "--help").stdout  # type: ignore[operator]
    for command in ("import", "ls", "show", "rm", "verify", "pin", "unpin", "gc"):
        assert command in help_text


def test_preferences_are_validated_and_can_be_unset(cli: object) -> None:
    assert (
        cli("prefs", "set", "models.cache.max_bytes", "2GB").stdout.strip()
        == "models.cache.max_bytes = 2000000000"
    )  # type: ignore[operator]
    unknown = cli("prefs", "set", "engine.threads", "4")  # type: ignore[operator]
    assert unknown.returncode == 1
    assert "'engine.threads' is not a preference" in unknown.stderr
    bad = cli("prefs", "set", "offline", "perhaps")  # type: ignore[operator]
    assert bad.returncode == 1
    assert "invalid value for offline" in bad.stderr
    assert cli("prefs", "set", "engine.context_length", "2048").returncode == 0  # type: ignore[operator]
    tiny_context = cli("prefs", "set", "engine.context_length", "10")  # type: ignore[operator]
    assert "invalid value for engine.context_length" in tiny_context.stderr
    listed = {p["key"]: p for p in json.loads(cli("prefs", "ls", "--json").stdout)}  # type: ignore[operator]
    assert listed["models.cache.max_bytes"]["overridden"] is True
    assert listed["engine.context_length"]["value"] == 2048
    assert listed["offline"] == {**listed["offline"], "value": False, "overridden": False}
    assert "(the setting)" in cli("prefs", "unset", "models.cache.max_bytes").stdout  # type: ignore[operator]
    listed = {p["key"]: p for p in json.loads(cli("prefs", "ls", "--json").stdout)}  # type: ignore[operator]
    assert listed["models.cache.max_bytes"]["value"] is None
    events = json.loads(cli("audit", "ls", "--action", "preferences.set", "--json").stdout)  # type: ignore[operator]
    # newest first (an unknown key is refused before anything is recorded)
    assert [event["outcome"] for event in events] == ["ok", "error", "ok", "error", "ok"]


def test_system_names_the_llama_cpp_build_and_where_models_run(cli: object) -> None:
    facts = as_json(cli("system", "--json"))  # type: ignore[operator]
    assert facts["gpu_offload"] in (True, False)  # type: ignore[index]
    assert "CPU" not in facts["gpu_backends"]  # type: ignore[index]
    devices = facts["devices"]  # type: ignore[index]
    assert "CPU" in [device["name"] for device in devices]
    text = cli("system").stdout  # type: ignore[operator]
    assert "llama.cpp devices: CPU" in text
    assert f"requests decoded together per model: {facts['engine']['parallel']} (this machine" in text  # type: ignore[index]
    assert "threads per model: " in text
    assert facts["llama_cpp_system_info"] in text  # type: ignore[index]
    # a GPU build on a host without a usable GPU says so instead of failing to start
    no_gpu = "no GPU: llama.cpp found no GPU it can use here" in text
    assert no_gpu == (bool(facts["gpu_backends"]) and all(d["kind"] == "cpu" for d in devices))  # type: ignore[index]
