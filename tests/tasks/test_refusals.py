"""Jobs the sandbox refuses, and machines where it cannot run: each with what to do."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import pytest

from appliance.errors import InvalidInput, NotReady
from appliance.tasks import Job, Sandbox


def test_without_bubblewrap_jobs_are_refused_with_how_to_install_it(work_dir: Path) -> None:
    sandbox = Sandbox(bwrap="/nonexistent/bwrap")
    capabilities = sandbox.capabilities()
    assert not capabilities.available
    assert "bubblewrap is not installed" in (capabilities.reason or "")
    with pytest.raises(NotReady, match="bubblewrap is not installed") as raised:
        sandbox.run(Job(mode="script", text="true", work_dir=work_dir))
    assert "install bubblewrap" in raised.value.hint


def test_without_prlimit_jobs_are_refused_with_what_to_install() -> None:
    capabilities = Sandbox(prlimit="/nonexistent/prlimit").capabilities()
    assert not capabilities.available
    assert capabilities.hint == "install util-linux, which has prlimit"


FAKE_BWRAP = """#!/bin/sh
# bubblewrap as it answers where user namespaces are not allowed
case "$1" in
--version) echo "bubblewrap 0.8.0" ;;
*) echo "bwrap: No permissions to create new namespace, likely because the kernel does not allow \
non-privileged user namespaces." >&2; exit 1 ;;
esac
"""

# bubblewrap that works for the probe, then fails before starting a job's sandbox (a job's
# options come through --args)
FAILS_LATER_BWRAP = """#!/bin/sh
case " $* " in
*" --args "*) echo "bwrap: Creating new namespace failed: No space left on device" >&2; exit 1 ;;
*) exec /usr/bin/bwrap "$@" ;;
esac
"""


def _fake(shared_dir: Path, text: str) -> str:
    path = shared_dir / "bwrap"
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_where_namespaces_are_not_allowed_jobs_are_refused_with_what_to_allow(
    shared_dir: Path, work_dir: Path
) -> None:
    sandbox = Sandbox(bwrap=_fake(shared_dir, FAKE_BWRAP))
    capabilities = sandbox.capabilities()
    assert not capabilities.available
    assert "No permissions to create new namespace" in (capabilities.reason or "")
    assert "unprivileged user namespaces" in (capabilities.hint or "")
    with pytest.raises(NotReady, match="cannot create a sandbox here"):
        sandbox.run(Job(mode="script", text="true", work_dir=work_dir))


def test_a_sandbox_that_fails_to_start_says_why(shared_dir: Path, work_dir: Path) -> None:
    sandbox = Sandbox(bwrap=_fake(shared_dir, FAILS_LATER_BWRAP))
    assert sandbox.capabilities().available
    with pytest.raises(NotReady, match="No space left on device") as raised:
        sandbox.run(Job(mode="script", text="true", work_dir=work_dir))
    assert "user namespaces" in raised.value.hint


def test_capabilities_say_what_holds_a_job(sandbox: Sandbox) -> None:
    capabilities = sandbox.capabilities().as_dict()
    assert capabilities["available"]
    assert capabilities["seccomp"] is (platform.machine() == "x86_64")
    assert capabilities["no_new_privs"]
    assert "processes (RLIMIT_NPROC, the job's own)" in capabilities["limits"]
    assert capabilities["cgroup"].startswith("not applied")


@pytest.mark.parametrize(
    ("mode", "text", "problem"),
    [
        ("prompt", "say hi", "not a job mode"),
        ("script", "  \n", "empty"),
        ("commands", "echo a\0b", "NUL"),
    ],
)
def test_a_job_that_cannot_run_is_refused(work_dir: Path, mode: str, text: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        Job(mode=mode, text=text, work_dir=work_dir)  # type: ignore[arg-type]


def test_a_missing_or_relative_work_dir_is_refused(sandbox: Sandbox, work_dir: Path) -> None:
    for where in (work_dir / "absent", Path("relative")):
        with pytest.raises(InvalidInput, match="not an existing directory") as raised:
            sandbox.run(Job(mode="script", text="true", work_dir=where))
        assert "absolute path" in raised.value.hint


def test_an_inference_socket_that_is_not_a_socket_is_refused(sandbox: Sandbox, work_dir: Path) -> None:
    not_a_socket = work_dir / "inference.sock"
    not_a_socket.write_text("")
    job = Job(mode="script", text="true", work_dir=work_dir, inference_socket=not_a_socket)
    with pytest.raises(InvalidInput, match="not a listening Unix socket"):
        sandbox.run(job)


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs change user only when the appliance runs as root")
def test_as_root_a_work_dir_out_of_reach_of_the_job_user_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    work_dir = private / "work"
    work_dir.mkdir()
    with pytest.raises(InvalidInput, match="not searchable") as raised:
        sandbox.run(Job(mode="script", text="true", work_dir=work_dir))
    assert "chmod o+x" in raised.value.hint


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs change user only when the appliance runs as root")
def test_as_root_an_inference_socket_the_job_user_cannot_connect_to_is_refused(
    sandbox: Sandbox, work_dir: Path, shared_dir: Path
) -> None:
    path = shared_dir / "inference.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        path.chmod(0o755)
        job = Job(mode="script", text="true", work_dir=work_dir, inference_socket=path)
        with pytest.raises(InvalidInput, match="not writable by uid 65534") as raised:
            sandbox.run(job)
    assert "chmod 0666" in raised.value.hint
