"""The sandbox runner: one job under bubblewrap, and its result.

What a job sees, and nothing else (no /home, /root, /run, /var, /srv, /opt, /mnt, no data dir):

    /                               read-only: nothing can be created beside what is listed here
    /usr /etc /bin /sbin /lib*      the host's, read-only; a path given as hidden is empty there
    /work                           the job's work directory (its attachments), writable
    /tmp /var/tmp                   fresh and private, gone with the job
    /proc /dev                      its own: its processes only; null, zero, random, tty
    /.job/program                   the script or the commands it runs, read-only
    /run/appliance/inference.sock   the inference socket, only when the job was given one
    /.job/relay                     with it: the relay that puts it on the job's 127.0.0.1:11434

How it is held (bubblewrap's flags, then what runs inside):

- ``--unshare-all --unshare-user``: its own user, mount, PID, IPC, UTS and cgroup namespaces, and a
  network namespace with only a loopback that is down: no network at all. ``--disable-userns`` (where
  bubblewrap has it): no namespaces of its own inside. ``--cap-drop ALL``: no capabilities.
- bubblewrap sets ``PR_SET_NO_NEW_PRIVS``: nothing inside gains privileges (setuid files included).
  ``capabilities()`` checks it from inside, and that the seccomp filter of ``seccomp.py`` holds
  (on x86_64: system calls a job never needs, such as the kernel keyring, fail with EPERM).
- ``--clearenv``: the environment is PATH, HOME=/tmp, LANG and TMPDIR plus the allowed additions;
  nothing of the appliance's own (no APPLIANCE_* setting, no provider or cloud key). No file
  descriptor is inherited but stdin (/dev/null), stdout and stderr. bubblewrap reads its options
  (paths, variables) from a file (``--args``), so that ``ps`` on the host shows none of them.
- A job given an inference socket also gets ``INFERENCE_URL`` (OpenAI's base) and
  ``OLLAMA_BASE_URL`` (unless its socket carries only the MCP gateway: ``Job.inference`` false)
  pointing at 127.0.0.1:11434 on its own loopback, where ``relay.py`` (run by
  the system's /usr/bin/python3 before the program, outside its rlimits) passes each connection
  to the socket, and so to the forwarder (``forwarder.py``): the job's only way out.
- ``--new-session``: no terminal to push input into. ``--die-with-parent``: the job dies with us.
- When the appliance runs as root, jobs run as uid/gid 65534 (nobody): as root, the kernel would not
  count their processes, and a job never needs root. Its work directory is handed to that user, and
  must be reachable by it (parents searchable, e.g. mode 0711).
- Inside, PID 1 is a shell that runs the program under ``prlimit`` (RLIMIT_CPU, RLIMIT_AS,
  RLIMIT_NPROC, RLIMIT_FSIZE, set after the user namespace exists, so the process count is the job's
  alone) and reaps it, so that the job's usage reaches bubblewrap and us. When PID 1 ends, the kernel
  ends every process left in the job's PID namespace: the timeout and cancel kill PID 1, and nothing
  survives the job.
- Peak memory: bubblewrap, forked from the appliance, starts with the appliance's size as its own
  peak, so the kernel's figure counts only where it passes that; below it, the job's processes are
  sampled (VmHWM) while it runs.

Imports: the standard library, ``appliance.errors``, ``appliance.bridge`` and this package.
"""

from __future__ import annotations

import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from appliance.bridge import ThreadCall
from appliance.errors import InvalidInput, NotReady
from appliance.tasks.jobs import Job, JobResult, Outcome, Truncated, outcome_of_status
from appliance.tasks.output import OutputCapture, OutputChunk
from appliance.tasks.seccomp import filter_program

__all__ = [
    "DEFAULT_ALLOWED_ENV",
    "INFERENCE_SOCKET",
    "NOBODY",
    "WORK_DIR",
    "Sandbox",
    "SandboxCapabilities",
]

WORK_DIR = "/work"
INFERENCE_SOCKET = "/run/appliance/inference.sock"
PROGRAM = "/.job/program"
RELAY = "/.job/relay"
RELAY_PYTHON = "/usr/bin/python3"  # the system's: the job's view has /usr, not the appliance's venv
RELAY_SOURCE = Path(__file__).with_name("relay.py")
INFERENCE_ENV = {
    "INFERENCE_URL": "http://127.0.0.1:11434/v1",
    "OLLAMA_BASE_URL": "http://127.0.0.1:11434",
}
NOBODY = 65534  # uid and gid jobs run as when the appliance runs as root

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_TMP = "/tmp"  # noqa: S108 - the job's own fresh tmpfs, not the host's /tmp
BASE_ENV = {"PATH": SANDBOX_PATH, "HOME": SANDBOX_TMP, "LANG": "C.UTF-8", "TMPDIR": SANDBOX_TMP}
DEFAULT_ALLOWED_ENV = frozenset(
    {
        "INFERENCE_URL",
        "OLLAMA_BASE_URL",
        "OPENAI_BASE_URL",
        "TASK_ID",
        "RUN_ID",
        "JOB_ID",
        "MCP_URL",
        "LANG",
        "LC_ALL",
        "TZ",
        "TERM",
        "NO_COLOR",
    }
)

NAMESPACES_HINT = (
    "allow unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 (Debian), "
    "kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 24.04 and later) and "
    "user.max_user_namespaces above 0; in a container, start it with user namespaces allowed"
)
INSTALL_BWRAP_HINT = "install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap)"

# PID 1 inside: runs the program as its child, so that a signal ends the program as it would any
# process (PID 1 ignores the signals it has no handler for), and passes its status on.
_INIT = '"$@"; exit $?'
# With inference: the relay first; it returns once it listens (its server lives on, in the job).
_INIT_WITH_RELAY = f'{RELAY_PYTHON} -I -S {RELAY} || exit 125; "$@"; exit $?'
_POLL_SECONDS = 0.05  # how often a running job's timeout and cancel are looked at
_KILL_GRACE_SECONDS = 5.0  # after killing PID 1, how long bubblewrap gets before it is killed too
_PROBE_TIMEOUT_SECONDS = 10.0
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class SandboxCapabilities:
    """Whether jobs can run here, and what holds them: for the health check and the system page."""

    available: bool
    reason: str | None  # why not, when not
    hint: str | None  # what to do about it
    bwrap: str | None
    bwrap_version: str | None
    job_user: str
    no_new_privs: bool
    nested_namespaces_blocked: bool
    seccomp: bool
    limits: tuple[str, ...]  # the limits that apply to every job
    cgroup: str  # whether cgroup v2 memory and pids limits could apply, and why not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sandbox:
    """Runs jobs under bubblewrap. ``hidden`` paths are emptied in the job's view of the system
    (the config file when it sits under /etc, say; the data dir, /home and /root are never in it);
    ``allowed_env`` names the variables a job's ``env`` may set. ``bwrap`` and ``prlimit`` default
    to the ones on the PATH."""

    def __init__(
        self,
        *,
        hidden: Sequence[Path] = (),
        allowed_env: Iterable[str] = DEFAULT_ALLOWED_ENV,
        bwrap: str | None = None,
        prlimit: str | None = None,
    ) -> None:
        self._hidden = tuple(Path(path) for path in hidden)
        self._allowed_env = frozenset(allowed_env)
        self._bwrap = bwrap if bwrap is not None else shutil.which("bwrap")
        self._prlimit = prlimit if prlimit is not None else shutil.which("prlimit", path=SANDBOX_PATH)
        self._job_ids = (NOBODY, NOBODY) if os.geteuid() == 0 else None
        self._disable_userns = False  # bubblewrap 0.8 and later; known once probed
        self._seccomp = filter_program()
        self._capabilities: SandboxCapabilities | None = None
        self._probe_lock = threading.Lock()

    # -- what this machine allows -----------------------------------------------------------

    def capabilities(self) -> SandboxCapabilities:
        """Probe once (start a sandbox that reads its own status) and remember the answer."""
        with self._probe_lock:
            if self._capabilities is None:
                self._capabilities = self._probe()
            return self._capabilities

    def _probe(self) -> SandboxCapabilities:
        facts: dict[str, Any] = {
            "bwrap": self._bwrap,
            "bwrap_version": None,
            "job_user": (
                f"uid {NOBODY} (nobody): the appliance runs as root"
                if self._job_ids
                else f"the appliance's own user (uid {os.geteuid()})"
            ),
            "no_new_privs": False,
            "nested_namespaces_blocked": False,
            "seccomp": False,
            "limits": (),
            "cgroup": delegated_cgroup(),
        }

        def unavailable(reason: str, hint: str) -> SandboxCapabilities:
            return SandboxCapabilities(available=False, reason=reason, hint=hint, **facts)

        if self._bwrap is None or not os.access(self._bwrap, os.X_OK):
            return unavailable(
                f"bubblewrap is not installed ({self._bwrap or 'no bwrap on the PATH'})", INSTALL_BWRAP_HINT
            )
        if self._prlimit is None or not os.access(self._prlimit, os.X_OK):
            return unavailable(
                "prlimit is not installed: jobs could not be given their limits",
                "install util-linux, which has prlimit",
            )
        try:
            version = self._run_quietly([self._bwrap, "--version"]).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return unavailable(f"bubblewrap ({self._bwrap}) does not run: {exc}", INSTALL_BWRAP_HINT)
        facts["bwrap_version"] = version
        numbers = _VERSION.search(version)
        self._disable_userns = numbers is not None and tuple(map(int, numbers.groups())) >= (0, 8, 0)
        seccomp_fd = self._seccomp_fd()
        argv = [
            self._bwrap,
            *self._isolation_args(seccomp_fd),
            *self._system_view(),
            "--remount-ro",
            "/",
            "--",
            "/bin/sh",
            "-c",
            "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status",
        ]
        try:
            probe = self._run_quietly(argv, pass_fds=() if seccomp_fd is None else (seccomp_fd,))
        except (OSError, subprocess.SubprocessError) as exc:
            return unavailable(f"bubblewrap ({self._bwrap}) does not run: {exc}", NAMESPACES_HINT)
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        if probe.returncode != 0:
            said = probe.stderr.strip().splitlines() or [f"status {probe.returncode}"]
            return unavailable(f"bubblewrap cannot create a sandbox here: {said[-1]}", NAMESPACES_HINT)
        status = dict(line.split(":", 1) for line in probe.stdout.splitlines())
        facts["no_new_privs"] = status.get("NoNewPrivs", "").strip() == "1"
        facts["seccomp"] = status.get("Seccomp", "").strip() == "2"  # 2: a filter holds
        facts["nested_namespaces_blocked"] = self._disable_userns
        facts["limits"] = (
            "cpu time (RLIMIT_CPU)",
            "address space (RLIMIT_AS)",
            "processes (RLIMIT_NPROC, the job's own)",
            "file size (RLIMIT_FSIZE)",
            "wall-clock timeout (the whole job)",
            "output (per stream)",
        )
        return SandboxCapabilities(available=True, reason=None, hint=None, **facts)

    def _run_quietly(
        self, argv: list[str], *, pass_fds: tuple[int, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_PROBE_TIMEOUT_SECONDS,
            cwd="/",
            env={},
            check=False,
            **self._as_job_user(),
        )

    def _as_job_user(self) -> dict[str, Any]:
        if self._job_ids is None:
            return {}
        uid, gid = self._job_ids
        return {"user": uid, "group": gid, "extra_groups": []}

    # -- running a job ----------------------------------------------------------------------

    def stream(self, job: Job) -> ThreadCall[OutputChunk, JobResult]:
        """Run ``job`` on a worker thread, from async code: ``async for chunk in call`` yields its
        output as it comes, ``await call.result()`` its result; ``call.cancel()`` stops it.
        Create it inside a running event loop."""
        return ThreadCall(lambda report, cancel: self.run(job, on_output=report, cancel=cancel))

    def run(
        self,
        job: Job,
        *,
        on_output: Callable[[OutputChunk], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> JobResult:
        """Run ``job`` to its end and return what it did. ``on_output`` gets its output as it
        comes (on reader threads); setting ``cancel`` stops it. Blocks the calling thread, which
        must live until the job ends (bubblewrap's --die-with-parent watches it).

        Raises ``NotReady`` when this machine cannot run sandboxes (the reason says why),
        ``InvalidInput`` when the job asks for what the sandbox refuses; an exception raised by
        ``on_output`` stops the job and is raised here."""
        capabilities = self.capabilities()
        if not capabilities.available:
            raise NotReady(f"jobs cannot run here: {capabilities.reason}", hint=capabilities.hint)
        env = self._job_env(job.env)
        self._check_paths(job)
        if job.inference_socket is not None:
            if not os.access(RELAY_PYTHON, os.X_OK):
                wants = "inference" if job.inference else "MCP tools"
                raise NotReady(
                    f"a job with {wants} needs {RELAY_PYTHON}, which runs its relay, and this machine "
                    "has none",
                    hint=f"install python3 (apt-get install python3), or run the task without {wants}",
                )
            if job.inference:
                env.update(INFERENCE_ENV)
        if self._job_ids is not None:
            _hand_over(job.work_dir, *self._job_ids)

        callback_failures: list[BaseException] = []
        captures = [
            OutputCapture(stream, limit=job.limits.output_bytes, on_output=on_output)
            for stream in ("stdout", "stderr")
        ]
        program_fd = _memfd("job-program", job.program().encode())
        relay_fd = None if job.inference_socket is None else _memfd("job-relay", RELAY_SOURCE.read_bytes())
        seccomp_fd = self._seccomp_fd()
        info_read, info_write = os.pipe()
        argv = self._job_argv(
            job, env, program_fd=program_fd, relay_fd=relay_fd, info_fd=info_write, seccomp_fd=seccomp_fd
        )
        # The options (paths, variables) go through a file, not the command line, which every user
        # of the host can read; bubblewrap takes the command itself only from its command line.
        end_of_options = argv.index("--")
        args_fd = _memfd("job-args", b"".join(arg.encode() + b"\0" for arg in argv[1:end_of_options]))
        passed = (
            program_fd,
            info_write,
            args_fd,
            *(fd for fd in (seccomp_fd, relay_fd) if fd is not None),
        )
        size_at_spawn = _peak_resident_bytes("self")
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [argv[0], "--args", str(args_fd), *argv[end_of_options:]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                pass_fds=passed,
                cwd="/",
                env={},
                start_new_session=True,
                **self._as_job_user(),
            )
        except OSError as exc:
            os.close(info_read)
            raise NotReady(
                f"could not start bubblewrap ({self._bwrap}): {exc}", hint=INSTALL_BWRAP_HINT
            ) from exc
        finally:
            for fd in passed:
                os.close(fd)

        assert process.stdout is not None
        assert process.stderr is not None
        readers = [
            threading.Thread(target=_drain, args=(pipe, capture, callback_failures), daemon=True)
            for pipe, capture in zip((process.stdout, process.stderr), captures, strict=True)
        ]
        for reader in readers:
            reader.start()
        with os.fdopen(info_read, "rb") as info:
            sandbox_pid = _child_pid(info.read())
        stopped, status, sampled_peak, usage = _wait(
            process,
            sandbox_pid,
            deadline=started + job.limits.timeout_seconds,
            cancel=cancel,
            failures=callback_failures,
        )
        # bubblewrap's own peak counts our size at the fork: beyond it, the figure is the job's
        reaped_peak = usage.ru_maxrss * 1024
        peak = max(sampled_peak, reaped_peak if reaped_peak > size_at_spawn else 0)
        duration = time.monotonic() - started
        for reader in readers:
            reader.join()
        stdout, stderr = captures
        if sandbox_pid is None:
            said = stderr.text.strip().splitlines()
            raise NotReady(
                f"the sandbox could not start: {said[-1] if said else f'bubblewrap exited with {status}'}",
                hint=NAMESPACES_HINT,
            )
        if callback_failures:
            raise callback_failures[0]
        outcome, exit_code, signal_number = _ending(stopped, status)
        return JobResult(
            outcome=outcome,
            exit_code=exit_code,
            signal=signal_number,
            stdout=stdout.text,
            stderr=stderr.text,
            truncated=Truncated(stdout=stdout.truncated, stderr=stderr.truncated),
            duration_seconds=duration,
            peak_memory_bytes=peak,
            limits=job.limits,
        )

    def _job_env(self, additions: Mapping[str, str]) -> dict[str, str]:
        refused = sorted(name for name in additions if name not in self._allowed_env)
        if refused:
            raise InvalidInput(
                f"a job may not set {', '.join(refused)} in its environment",
                hint=f"set only {', '.join(sorted(self._allowed_env))}",
            )
        for name, value in additions.items():
            if "\0" in value:
                raise InvalidInput(f"the job's {name} holds a NUL byte", hint="send values without NUL bytes")
        return {**BASE_ENV, **additions}

    def _check_paths(self, job: Job) -> None:
        work_dir = job.work_dir
        if not work_dir.is_absolute() or not work_dir.is_dir():
            raise InvalidInput(
                f"the job's work directory {work_dir} is not an existing directory given by its "
                "absolute path",
                hint="create the directory, put the job's attachments in it and pass its absolute path",
            )
        socket = job.inference_socket
        if socket is not None and not (socket.is_absolute() and socket.is_socket()):
            raise InvalidInput(
                f"the inference socket {socket} is not a listening Unix socket given by its absolute path",
                hint="start the inference forwarder first and pass the absolute path of its socket",
            )
        if self._job_ids is None:
            return
        uid, gid = self._job_ids
        for path in (work_dir, *([socket] if socket is not None else [])):
            blocked = _first_unsearchable(path.resolve().parent, uid, gid)
            if blocked is not None:
                raise InvalidInput(
                    f"{path} is out of reach of uid {uid}, which jobs run as because the appliance "
                    f"runs as root: {blocked} is not searchable by it",
                    hint=f"keep it under directories others may search (chmod o+x {blocked}, e.g. 0711), "
                    "or run the appliance as an ordinary user",
                )
        if socket is not None and not _permits(socket.stat(), uid, gid, write=True):
            raise InvalidInput(
                f"the inference socket {socket} is not writable by uid {uid}, which jobs run as because "
                "the appliance runs as root (connecting to a socket needs write permission)",
                hint=f"make the socket writable by others (chmod 0666) or owned by uid {uid}",
            )

    def _seccomp_fd(self) -> int | None:
        return None if self._seccomp is None else _memfd("job-seccomp", self._seccomp)

    def _isolation_args(self, seccomp_fd: int | None) -> list[str]:
        return [
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            "--unshare-all",
            "--unshare-user",
            *(["--disable-userns"] if self._disable_userns else []),
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            SANDBOX_TMP,
            "--tmpfs",
            "/var/tmp",  # noqa: S108 - the job's own, as /tmp
        ]

    def _system_view(self) -> list[str]:
        """The host's system directories, read-only (merged /usr links as links), less the hidden."""
        args: list[str] = []
        bound: list[Path] = []
        for name in SYSTEM_DIRS:
            path = Path(name)
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), name]
            elif path.is_dir():
                args += ["--ro-bind", name, name]
                bound.append(path.resolve())
        for hidden in self._hidden:
            real = hidden.resolve()
            if not any(real.is_relative_to(root) for root in bound) or not real.exists():
                continue  # outside the view already
            if real.is_dir():
                args += ["--tmpfs", str(real), "--remount-ro", str(real)]
            else:
                args += ["--ro-bind", "/dev/null", str(real)]
        return args

    def _job_argv(
        self,
        job: Job,
        env: Mapping[str, str],
        *,
        program_fd: int,
        relay_fd: int | None,
        info_fd: int,
        seccomp_fd: int | None,
    ) -> list[str]:
        assert self._bwrap is not None  # the probe found both
        assert self._prlimit is not None
        limits = job.limits
        argv = [self._bwrap, *self._isolation_args(seccomp_fd), *self._system_view()]
        argv += ["--bind", str(job.work_dir.resolve()), WORK_DIR]
        if job.inference_socket is not None:
            argv += ["--bind", str(job.inference_socket.resolve()), INFERENCE_SOCKET]
        argv += ["--perms", "0555", "--ro-bind-data", str(program_fd), PROGRAM]
        if relay_fd is not None:
            argv += ["--perms", "0444", "--ro-bind-data", str(relay_fd), RELAY]
        argv += ["--remount-ro", "/", "--chdir", WORK_DIR, "--info-fd", str(info_fd)]
        for name, value in env.items():
            argv += ["--setenv", name, value]
        program = [PROGRAM] if job.has_interpreter_line else ["/bin/sh", PROGRAM]
        return [
            *argv,
            "--as-pid-1",
            "--",
            "/bin/sh",
            "-c",
            _INIT if relay_fd is None else _INIT_WITH_RELAY,
            "sandbox",
            self._prlimit,
            # SIGXCPU at the limit, SIGKILL a second later for a job that ignores it
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--as={limits.address_space_bytes}",
            f"--nproc={limits.processes}",
            f"--fsize={limits.file_size_bytes}",
            "--",
            *program,
        ]


def _drain(pipe: IO[bytes], capture: OutputCapture, failures: list[BaseException]) -> None:
    """Read one stream to its end (past the cap too: a job must never block on a full pipe)."""
    with pipe:
        fd = pipe.fileno()
        while chunk := os.read(fd, 65536):
            try:
                capture.feed(chunk)
            except BaseException as exc:  # from on_output: the job is stopped, then it is raised
                failures.append(exc)
                capture = OutputCapture(capture.stream, limit=0)
        capture.close()


def _ending(stopped: Outcome | None, status: int) -> tuple[Outcome, int | None, int | None]:
    """The outcome, exit code and signal of a job from why we stopped it and bubblewrap's status."""
    if stopped is not None:
        return stopped, None, int(signal.SIGKILL)
    if status < 0:  # bubblewrap itself was killed, and the job with it
        return Outcome.SIGNALLED, None, -status
    outcome, signal_number = outcome_of_status(status)
    return outcome, status, signal_number


def _memfd(name: str, content: bytes) -> int:
    """A file in memory holding ``content``, read from its start (bubblewrap copies it in)."""
    fd = os.memfd_create(name)
    with open(fd, "wb", closefd=False) as file:
        file.write(content)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _child_pid(info: bytes) -> int | None:
    """PID 1's pid (in our namespace) from bubblewrap's --info-fd JSON; None when it started none."""
    found = re.search(rb'"child-pid"\s*:\s*(\d+)', info)
    return int(found.group(1)) if found else None


def _wait(
    process: subprocess.Popen[bytes],
    sandbox_pid: int | None,
    *,
    deadline: float,
    cancel: threading.Event | None,
    failures: list[BaseException],
) -> tuple[Outcome | None, int, int, resource.struct_rusage]:
    """Wait for bubblewrap to end, killing the job at the deadline or on cancel; then reap it.
    Returns why the job was stopped (None when it ended by itself), its status, the peak memory
    seen in its processes meanwhile and bubblewrap's usage."""
    bwrap_fd = os.pidfd_open(process.pid)
    sandbox_fd = _pidfd(sandbox_pid)
    stopped: Outcome | None = None
    killed_at = 0.0
    peak = 0
    try:
        while not select.select([bwrap_fd], [], [], _POLL_SECONDS)[0]:
            if sandbox_pid is not None:
                peak = max(peak, _job_peak_bytes(sandbox_pid))
            now = time.monotonic()
            if stopped is None:
                if (cancel is not None and cancel.is_set()) or failures:
                    stopped = Outcome.CANCELLED
                elif now >= deadline:
                    stopped = Outcome.TIMED_OUT
                if stopped is not None:
                    killed_at = now
                    _kill(sandbox_fd, process.pid)
            elif now - killed_at > _KILL_GRACE_SECONDS:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        if sandbox_fd is not None:
            # PID 1 ends only once the kernel has ended the rest of the job: wait for that too,
            # for when bubblewrap was killed from outside and did not wait itself.
            select.select([sandbox_fd], [], [], _KILL_GRACE_SECONDS)
    finally:
        os.close(bwrap_fd)
        if sandbox_fd is not None:
            os.close(sandbox_fd)
    _, wait_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return stopped, process.returncode, peak, usage


def _job_peak_bytes(pid1: int) -> int:
    """The largest peak resident size (VmHWM) among the job's live processes: PID 1 and its
    descendants. A sample: what a process reached before it ended is known only from reaping."""
    peak = 0
    pending = [pid1]
    while pending:
        pid = pending.pop()
        peak = max(peak, _peak_resident_bytes(str(pid)))
        with suppress(OSError, ValueError):  # it ended while we looked
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return peak


def _peak_resident_bytes(pid: str) -> int:
    with suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _pidfd(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:  # the job has already ended
        return None


def _kill(sandbox_fd: int | None, bwrap_pid: int) -> None:
    """Kill PID 1 of the job: the kernel then kills every process in its namespace, and
    bubblewrap exits once they are all gone. With no PID 1, kill bubblewrap's group."""
    with suppress(ProcessLookupError):
        if sandbox_fd is not None:
            signal.pidfd_send_signal(sandbox_fd, signal.SIGKILL)
        else:
            os.killpg(bwrap_pid, signal.SIGKILL)


def _hand_over(work_dir: Path, uid: int, gid: int) -> None:
    """Give the work directory and what is in it to the job's user (links are not followed)."""
    os.lchown(work_dir, uid, gid)
    for root, dirs, files in os.walk(work_dir):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _first_unsearchable(directory: Path, uid: int, gid: int) -> Path | None:
    """The first of ``directory`` and its parents that ``uid``/``gid`` may not pass through."""
    for path in (*reversed(directory.parents), directory):
        if not _permits(path.stat(), uid, gid, write=False):
            return path
    return None


def _permits(status: os.stat_result, uid: int, gid: int, *, write: bool) -> bool:
    """Whether ``uid``/``gid`` may write (else search or execute) what ``status`` describes."""
    if status.st_uid == uid:
        bit = stat.S_IWUSR if write else stat.S_IXUSR
    elif status.st_gid == gid:
        bit = stat.S_IWGRP if write else stat.S_IXGRP
    else:
        bit = stat.S_IWOTH if write else stat.S_IXOTH
    return bool(status.st_mode & bit)


def delegated_cgroup() -> str:
    """Whether a cgroup v2 this process may manage has the memory and pids controllers, in words.
    The runner does not create cgroups yet: where one is delegated this says so, for the operator."""
    try:
        line = next(
            entry for entry in Path("/proc/self/cgroup").read_text().splitlines() if entry.startswith("0::")
        )
    except (OSError, StopIteration):
        return "not applied: this machine has no cgroup v2"
    root = Path("/sys/fs/cgroup")
    group = root / line.removeprefix("0::").lstrip("/")
    try:
        controllers = set((group / "cgroup.controllers").read_text().split())
    except OSError:
        return "not applied: cgroup v2 is not mounted at /sys/fs/cgroup (a hybrid or v1 hierarchy)"
    missing = sorted({"memory", "pids"} - controllers)
    if missing:
        lacking = " and ".join(missing)
        return f"not applied: this process's cgroup v2 ({group}) lacks the {lacking} controllers"
    if not os.access(group / "cgroup.subtree_control", os.W_OK):
        return f"not applied: this process's cgroup v2 ({group}) is not delegated to it"
    return f"not applied: a delegated cgroup v2 ({group}) exists, but jobs are held by rlimits only"
