"""Fixtures for sandboxed jobs: a real bubblewrap sandbox and work directories it can reach."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.tasks import Job, JobResult, Limits, Sandbox


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the job's user can pass through (mode 0711), outside pytest's private tmp:
    as root the appliance runs jobs as nobody, who must reach the work directory."""
    path = Path(tempfile.mkdtemp(prefix="appliance-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work_dir(shared_dir: Path) -> Path:
    path = shared_dir / "work"
    path.mkdir()
    return path


@pytest.fixture
def sandbox() -> Sandbox:
    sandbox = Sandbox()
    capabilities = sandbox.capabilities()
    assert capabilities.available, f"{capabilities.reason}: {capabilities.hint}"
    return sandbox


RunScript = Callable[..., JobResult]


@pytest.fixture
def run_script(sandbox: Sandbox, work_dir: Path) -> RunScript:
    """Run a script in the work directory; keyword arguments are ``Limits`` fields."""

    def run(text: str, **limits: int | float) -> JobResult:
        return sandbox.run(Job(mode="script", text=text, work_dir=work_dir, limits=Limits(**limits)))

    return run


def processes_with(marker: str) -> dict[int, str]:
    """The processes on this machine whose command line carries ``marker``: pid and command line."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        if marker in text:
            found[int(cmdline.parent.name)] = text
    return found
