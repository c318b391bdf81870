"""Limits a job cannot pass, the timeout and cancel, with what the user reads about each."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from pathlib import Path

import pytest

from appliance.errors import InvalidInput
from appliance.tasks import Job, JobResult, Limits, Outcome, OutputChunk, Sandbox
from tests.tasks.conftest import RunScript, processes_with


def test_the_timeout_kills_the_job_and_everything_it_started(run_script: RunScript) -> None:
    result = run_script(
        "sleep 987651 >/dev/null 2>&1 &\n"
        "(sleep 987652 &)\n"
        "setsid sleep 987653 &\n"
        "echo started\n"
        "sleep 987654\n",
        timeout_seconds=1,
    )
    assert result.outcome is Outcome.TIMED_OUT
    assert (result.exit_code, result.signal) == (None, signal.SIGKILL)
    assert result.reason == "stopped after its time limit of 1 s"
    assert result.stdout == "started\n"
    assert processes_with("sleep 98765") == {}


def test_background_processes_end_with_the_job(run_script: RunScript) -> None:
    result = run_script("sleep 987661 >/dev/null 2>&1 &\necho done\n")
    assert result.ok
    assert processes_with("sleep 98766") == {}


def test_the_cpu_time_limit_stops_an_endless_loop(run_script: RunScript) -> None:
    result = run_script("while :; do :; done\n", cpu_seconds=1)
    assert result.outcome is Outcome.CPU_LIMIT
    assert (result.exit_code, result.signal) == (128 + signal.SIGXCPU, signal.SIGXCPU)
    assert result.reason == "stopped at its CPU time limit of 1 s (SIGXCPU)"


def test_the_file_size_limit_stops_a_big_write(run_script: RunScript, work_dir: Path) -> None:
    result = run_script("head -c 3000000 /dev/zero > big\n", file_size_bytes=1_000_000)
    assert result.outcome is Outcome.FILE_SIZE_LIMIT
    assert result.signal == signal.SIGXFSZ
    assert "past its limit of 1000000 bytes" in result.reason
    assert (work_dir / "big").stat().st_size == 1_000_000


def test_a_fork_bomb_is_held_at_the_process_limit(run_script: RunScript, work_dir: Path) -> None:
    # Bounded even if the limit failed: at most 40 sleepers, and they end with the job.
    result = run_script("for i in $(seq 40); do sleep 987671 & echo $! >> started; done\n", processes=12)
    started = (work_dir / "started").read_text().split()
    assert len(started) < 12
    assert "fork" in result.stderr.lower()
    assert result.exit_code != 0
    assert processes_with("sleep 98767") == {}


def test_the_address_space_limit_stops_a_memory_hog(run_script: RunScript) -> None:
    result = run_script(
        '#!/usr/bin/python3\nhog = b"a" * 200_000_000\nprint("survived")\n', address_space_bytes=64 * 1024**2
    )
    assert "survived" not in result.stdout
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


def test_peak_memory_is_the_largest_process(run_script: RunScript) -> None:
    small = run_script("true\n")
    big = run_script('#!/usr/bin/python3\nimport time\nhog = b"a" * 40_000_000\ntime.sleep(0.3)\n')
    assert big.peak_memory_bytes > 40_000_000 > small.peak_memory_bytes


def test_when_bubblewrap_is_killed_the_job_dies_with_it(sandbox: Sandbox, work_dir: Path) -> None:
    def kill_bubblewrap(chunk: OutputChunk) -> None:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            # this process's threads, and their children, come and go while it looks
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for child in (task / "children").read_text().split():
                    if os.readlink(f"/proc/{child}/exe").endswith("bwrap"):
                        os.kill(int(child), signal.SIGKILL)

    job = Job(
        mode="script",
        text="sleep 987702 >/dev/null 2>&1 &\necho started\nsleep 987703\n",
        work_dir=work_dir,
    )
    result = sandbox.run(job, on_output=kill_bubblewrap)
    assert (result.outcome, result.exit_code, result.signal) == (Outcome.SIGNALLED, None, signal.SIGKILL)
    assert result.reason == "killed by SIGKILL"
    assert processes_with("sleep 98770") == {}


def test_bubblewrap_s_command_line_shows_nothing_of_the_job(sandbox: Sandbox, work_dir: Path) -> None:
    seen: list[str] = []

    def look(chunk: OutputChunk) -> None:
        seen.extend(processes_with("t-987711").values())

    job = Job(mode="script", text="echo started\n", work_dir=work_dir, env={"TASK_ID": "t-987711"})
    assert sandbox.run(job, on_output=look).stdout == "started\n"
    assert seen == []


def test_a_cancelled_job_stops_with_everything_it_started(sandbox: Sandbox, work_dir: Path) -> None:
    cancel = threading.Event()

    def on_output(chunk: OutputChunk) -> None:
        if "started" in chunk.text:
            cancel.set()

    job = Job(mode="script", text="sleep 987681 &\necho started\nsleep 987682\n", work_dir=work_dir)
    result = sandbox.run(job, on_output=on_output, cancel=cancel)
    assert result.outcome is Outcome.CANCELLED
    assert result.reason == "cancelled"
    assert processes_with("sleep 98768") == {}


def test_an_error_in_the_output_callback_stops_the_job_and_is_raised(
    sandbox: Sandbox, work_dir: Path
) -> None:
    def on_output(chunk: OutputChunk) -> None:
        raise RuntimeError("the listener went away")

    job = Job(mode="script", text="echo hi\nsleep 987691\n", work_dir=work_dir)
    with pytest.raises(RuntimeError, match="listener went away"):
        sandbox.run(job, on_output=on_output)
    assert processes_with("sleep 98769") == {}


def test_output_streams_to_async_code_as_it_comes(sandbox: Sandbox, work_dir: Path) -> None:
    job = Job(mode="script", text="echo one\necho two >&2\necho three\n", work_dir=work_dir)

    async def follow() -> tuple[list[OutputChunk], JobResult]:
        call = sandbox.stream(job)
        chunks = [chunk async for chunk in call]
        return chunks, await call.result()

    chunks, result = asyncio.run(follow())
    assert "".join(chunk.text for chunk in chunks if chunk.stream == "stdout") == "one\nthree\n"
    assert [chunk.text for chunk in chunks if chunk.stream == "stderr"] == ["two\n"]
    assert result.stdout == "one\nthree\n"


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        ({"cpu_seconds": 0}, "cpu_seconds"),
        ({"processes": -1}, "processes"),
        ({"file_size_bytes": 1.5}, "file_size_bytes"),
        ({"output_bytes": True}, "output_bytes"),
        ({"timeout_seconds": 0.0}, "timeout_seconds"),
    ],
)
def test_a_limit_that_is_not_a_positive_number_is_refused(limits: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidInput, match=named):
        Limits(**limits)  # type: ignore[arg-type]


def test_a_fractional_timeout_is_accepted() -> None:
    assert Limits(timeout_seconds=0.5).timeout_seconds == 0.5
