"""What the sandbox runs (``Job``, its ``Limits``) and what it hands back (``JobResult``).

A job is a script (run by ``/bin/sh``, or by the interpreter its ``#!`` line names) or commands
(one per line, run in order by one shell that stops at the first one that fails, as ``set -e``
does), run in a work directory the caller prepared with the job's attachments. The work directory
is the job's ``/work``, writable; everything else it sees is read-only or private to it.

Imports: the standard library and ``appliance.errors``.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from appliance.errors import InvalidInput

__all__ = ["Job", "JobMode", "JobResult", "Limits", "Outcome", "Truncated", "outcome_of_status"]

JobMode = Literal["script", "commands"]

KiB = 1024
GiB = 1024**3


@dataclass(frozen=True)
class Limits:
    """What one job may use. CPU time, address space and file size hold per process (they are
    rlimits); ``processes`` counts the job's processes and threads together."""

    cpu_seconds: int = 300
    address_space_bytes: int = 4 * GiB
    processes: int = 256
    file_size_bytes: int = 1 * GiB
    timeout_seconds: float = 600.0
    output_bytes: int = 256 * KiB  # per stream: stdout and stderr each

    def __post_init__(self) -> None:
        for limit in fields(self):
            value = getattr(self, limit.name)
            kinds = (int, float) if limit.type == "float" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
                raise InvalidInput(
                    f"the job limit {limit.name} must be a positive {limit.type}, not {value!r}",
                    hint=f"give {limit.name} a value above zero, or leave it out for the default",
                )


@dataclass(frozen=True)
class Job:
    """One run of a script or of commands. ``env`` adds variables to the job's clean environment
    (only names the sandbox allows); ``inference_socket`` is bind-mounted for the job when given,
    with the inference variables unless ``inference`` is false (a socket for the MCP gateway alone)."""

    mode: JobMode
    text: str
    work_dir: Path
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)
    inference_socket: Path | None = None
    inference: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("script", "commands"):
            raise InvalidInput(
                f"{self.mode!r} is not a job mode", hint="run a job as 'script' or as 'commands'"
            )
        if "\0" in self.text:
            raise InvalidInput(f"the job's {self.mode} holds a NUL byte", hint="send text without NUL bytes")
        if not self.text.strip():
            raise InvalidInput(f"the job's {self.mode} is empty", hint=f"give the {self.mode} to run")

    def program(self) -> str:
        """The file the sandbox runs: the script itself, or the commands under ``set -e``."""
        if self.mode == "script":
            return self.text
        return "set -e\n" + self.text + ("" if self.text.endswith("\n") else "\n")

    @property
    def has_interpreter_line(self) -> bool:
        """A script that starts with ``#!`` is run by that interpreter, as the kernel runs it."""
        return self.mode == "script" and self.text.startswith("#!")


class Outcome(StrEnum):
    """How a job ended."""

    EXITED = "exited"  # by itself; exit_code says whether it succeeded
    SIGNALLED = "signalled"  # a signal ended it (its own, or SIGKILL at the hard CPU limit)
    CPU_LIMIT = "cpu_limit"  # SIGXCPU: it used its CPU seconds
    FILE_SIZE_LIMIT = "file_size_limit"  # SIGXFSZ: it wrote a file past file_size_bytes
    TIMED_OUT = "timed_out"  # still running at timeout_seconds: stopped, with everything it started
    CANCELLED = "cancelled"  # stopped on request, with everything it started


@dataclass(frozen=True)
class Truncated:
    """Whether a stream printed more than the output cap (the text kept ends before the cap)."""

    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class JobResult:
    """What a job did. ``exit_code`` is its status as a shell reports it: 128 + N when signal N
    ended it (``signal`` is then N). When the sandbox stopped it (timeout, cancel), ``exit_code``
    is None and ``signal`` is SIGKILL.
    ``peak_memory_bytes`` is the largest resident size one of its processes reached: exact where
    it passes the appliance's own size (the kernel's count when the job is reaped), else the
    largest seen while sampling every 50 ms, which a process living less than that can escape."""

    outcome: Outcome
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    truncated: Truncated
    duration_seconds: float
    peak_memory_bytes: int
    limits: Limits

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.EXITED and self.exit_code == 0

    @property
    def task_state(self) -> Literal["succeeded", "failed", "canceled"]:
        """The state a task whose job this was ends in."""
        return "succeeded" if self.ok else "canceled" if self.outcome is Outcome.CANCELLED else "failed"

    def task_result(self) -> dict[str, Any]:
        """The result a task whose job this was keeps (its output is in files, not here)."""
        return {
            "outcome": self.outcome.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "duration_seconds": round(self.duration_seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "truncated": {"stdout": self.truncated.stdout, "stderr": self.truncated.stderr},
            "reason": self.reason,
        }

    @property
    def reason(self) -> str:
        """One line a user reads: how the job ended and which limit, if any, stopped it."""
        limits = self.limits
        match self.outcome:
            case Outcome.EXITED:
                return f"exited with status {self.exit_code}"
            case Outcome.CPU_LIMIT:
                return f"stopped at its CPU time limit of {limits.cpu_seconds} s (SIGXCPU)"
            case Outcome.FILE_SIZE_LIMIT:
                return f"stopped writing a file past its limit of {limits.file_size_bytes} bytes (SIGXFSZ)"
            case Outcome.TIMED_OUT:
                return f"stopped after its time limit of {limits.timeout_seconds:g} s"
            case Outcome.CANCELLED:
                return "cancelled"
            case Outcome.SIGNALLED:
                return f"killed by {_signal_name(self.signal)}"


def _signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number).name if number is not None else "a signal"
    except ValueError:
        return f"signal {number}"


def outcome_of_status(status: int) -> tuple[Outcome, int | None]:
    """The outcome and signal of a shell-style exit status (128 + N when signal N ended it)."""
    number = status - 128
    if status <= 128 or number not in signal.valid_signals():
        return Outcome.EXITED, None
    if number == signal.SIGXCPU:
        return Outcome.CPU_LIMIT, number
    if number == signal.SIGXFSZ:
        return Outcome.FILE_SIZE_LIMIT, number
    return Outcome.SIGNALLED, number
