"""What a job can see and reach from inside the sandbox (real bubblewrap)."""

from __future__ import annotations

import os
import platform
import socket
import threading
from pathlib import Path

import pytest

from appliance.errors import InvalidInput
from appliance.tasks import INFERENCE_SOCKET, Job, Outcome, Sandbox
from tests.tasks.conftest import RunScript


def test_a_script_prints_and_its_exit_code_comes_back(run_script: RunScript) -> None:
    result = run_script("echo hello\necho oops >&2\nexit 3\n")
    assert (result.stdout, result.stderr) == ("hello\n", "oops\n")
    assert (result.outcome, result.exit_code, result.signal) == (Outcome.EXITED, 3, None)
    assert result.reason == "exited with status 3"
    assert not result.ok


def test_a_script_with_an_interpreter_line_runs_in_that_interpreter(run_script: RunScript) -> None:
    result = run_script('#!/bin/bash\necho "${BASH_VERSION:+bash}"\n')
    assert result.ok
    assert result.stdout == "bash\n"


def test_commands_run_in_order_in_one_shell_and_stop_at_the_first_failure(
    sandbox: Sandbox, work_dir: Path
) -> None:
    commands = "mkdir sub\ncd sub\npwd\nfalse\necho never"
    result = sandbox.run(Job(mode="commands", text=commands, work_dir=work_dir))
    assert result.stdout == "/work/sub\n"
    assert result.exit_code == 1


def test_the_job_has_no_network(run_script: RunScript) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with listener:
        result = run_script(f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected\n")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert "connected" not in result.stdout
    assert result.exit_code != 0


def test_the_data_dir_home_and_a_secret_file_are_not_visible(
    run_script: RunScript, data_dir: Path, tmp_path: Path
) -> None:
    data_dir.mkdir()
    (data_dir / "appliance.db").write_text("registry")
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    result = run_script(
        f"ls {data_dir} || echo no-data-dir\n"
        f"cat {secret} || echo no-secret\n"
        "ls /home || echo no-home\n"
        "ls /root || echo no-root\n"
    )
    assert result.stdout == "no-data-dir\nno-secret\nno-home\nno-root\n"
    assert "hunter2" not in result.stdout + result.stderr


def test_a_path_given_as_hidden_is_empty_inside(work_dir: Path) -> None:
    script = "ls /usr/share | wc -l\ncat /etc/os-release | grep -c ^ID=\n"
    seen = Sandbox().run(Job(mode="script", text=script, work_dir=work_dir))
    hidden = Sandbox(hidden=[Path("/usr/share"), Path("/etc/os-release")]).run(
        Job(mode="script", text=script, work_dir=work_dir)
    )
    files_in_share, os_release_ids = seen.stdout.split()
    assert files_in_share != "0"
    assert os_release_ids == "1"
    assert hidden.stdout.split() == ["0", "0"]


def test_the_environment_holds_no_secret_of_the_parent(
    run_script: RunScript, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLIANCE_SECRET", "s3cr3t-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s3cr3t")
    result = run_script("env\n")
    assert "s3cr3t" not in result.stdout
    names = {line.partition("=")[0] for line in result.stdout.splitlines()}
    assert names <= {"PATH", "HOME", "LANG", "TMPDIR", "PWD"}


def test_allowed_variables_reach_the_job(sandbox: Sandbox, work_dir: Path) -> None:
    job = Job(mode="script", text='echo "$TASK_ID"\n', work_dir=work_dir, env={"TASK_ID": "t-42"})
    assert sandbox.run(job).stdout == "t-42\n"


def test_a_variable_not_allowed_is_refused_and_nothing_runs(sandbox: Sandbox, work_dir: Path) -> None:
    job = Job(mode="script", text="touch ran\n", work_dir=work_dir, env={"LD_PRELOAD": "/tmp/x.so"})
    with pytest.raises(InvalidInput, match="LD_PRELOAD") as raised:
        sandbox.run(job)
    assert "TASK_ID" in raised.value.hint
    assert not (work_dir / "ran").exists()


def test_attachments_are_readable_the_work_dir_writable_and_the_rest_read_only(
    run_script: RunScript, work_dir: Path
) -> None:
    (work_dir / "data.txt").write_text("attached\n")
    result = run_script(
        "cat data.txt\n"
        "echo made > out.txt\n"
        "echo scratch > /tmp/scratch && echo tmp-writable\n"
        "for target in / /usr /etc; do touch $target/x 2>/dev/null || echo $target read-only; done\n"
    )
    assert result.stdout == "attached\ntmp-writable\n/ read-only\n/usr read-only\n/etc read-only\n"
    assert (work_dir / "out.txt").read_text() == "made\n"


def test_the_job_cannot_gain_privileges(sandbox: Sandbox, run_script: RunScript) -> None:
    result = run_script("grep -E '^(NoNewPrivs|CapEff):' /proc/self/status\n")
    assert result.stdout.split() == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1"]
    assert sandbox.capabilities().no_new_privs


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is written for x86_64")
def test_system_calls_a_job_never_needs_fail(run_script: RunScript) -> None:
    result = run_script(
        "#!/usr/bin/python3\n"
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, number in (('keyctl', 250), ('perf_event_open', 298), ('bpf', 321)):\n"
        "    libc.syscall(number, 0, 0, 0, 0, 0)\n"
        "    print(name, os.strerror(ctypes.get_errno()))\n"
        "print(open('/proc/self/status').read().count('Seccomp:\\t2'))\n"
    )
    assert result.stdout.splitlines() == [
        "keyctl Operation not permitted",
        "perf_event_open Operation not permitted",
        "bpf Operation not permitted",
        "1",
    ]


def test_an_inherited_file_descriptor_is_not_visible(run_script: RunScript, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        result = run_script(f"ls /proc/self/fd\ncat /proc/self/fd/{fd} || echo closed\n")
    finally:
        os.close(fd)
    # 0-2 are stdin, stdout and stderr; 3 is ls reading the directory
    assert result.stdout.split() == ["0", "1", "2", "3", "closed"]


def test_the_inference_socket_is_reachable_only_when_given(
    sandbox: Sandbox, work_dir: Path, shared_dir: Path
) -> None:
    path = shared_dir / "inference.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    path.chmod(0o666)  # the job may run as another user
    server.listen()

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"from the appliance\n")

    answering = threading.Thread(target=answer)
    answering.start()
    client = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({INFERENCE_SOCKET!r})\n"
        "print(s.recv(100).decode(), end='')\n"
    )
    script = f"#!/usr/bin/python3\n{client}"
    with server:
        given = sandbox.run(Job(mode="script", text=script, work_dir=work_dir, inference_socket=path))
        answering.join()
        absent = sandbox.run(Job(mode="script", text=script, work_dir=work_dir))
    assert given.stdout == "from the appliance\n"
    assert absent.exit_code != 0
    assert "FileNotFoundError" in absent.stderr
