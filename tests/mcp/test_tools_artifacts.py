"""The artifacts tools on a job's own work directory: paths, links, sizes, encodings, and where the
work directory is not this server's."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import BodyTooLarge, Forbidden, InvalidInput, NotFound, TaskElsewhere, TaskNotFound
from appliance.identity import TaskScope
from appliance.mcp.tools.artifacts import _directory
from appliance.runtime import Runtime
from appliance.store.base import Task
from appliance.tasks.service import NewTask
from tests.mcp.direct import job_scope, run_tool


def make_task(runtime: Runtime, **limits: float) -> Task:
    task, _ = runtime.tasks.create(
        NewTask(mode="commands", text="true", limits=limits), (), Context("user:alice")
    )
    return task


@pytest.fixture
def task(runtime: Runtime) -> Task:
    return make_task(runtime)


@pytest.fixture
def work(runtime: Runtime, task: Task) -> Path:
    return runtime.tasks.task_dir(task.id) / "work"


def test_a_job_writes_lists_and_reads_its_own_files(runtime: Runtime, task: Task, work: Path) -> None:
    scope = job_scope(task.id)
    wrote = run_tool(runtime, "artifacts.write", {"path": "out/notes.txt", "content": "héllo\n"}, scope=scope)
    assert (wrote.path, wrote.written, wrote.size) == ("out/notes.txt", 7, 7)
    assert (work / "out" / "notes.txt").read_text() == "héllo\n"
    more = {"path": "./out//notes.txt", "content": "more", "append": True}
    added = run_tool(runtime, "artifacts.write", more, scope=scope)
    assert (added.written, added.size) == (4, 11)
    raw = bytes(range(256))
    run_tool(
        runtime,
        "artifacts.write",
        {"path": "blob.bin", "content": base64.b64encode(raw).decode(), "encoding": "base64"},
        scope=scope,
    )
    assert (work / "blob.bin").read_bytes() == raw

    listed = run_tool(runtime, "artifacts.list", {}, scope=scope)
    assert [(e.path, e.type, e.size) for e in listed.entries] == [
        ("blob.bin", "file", 256),
        ("out", "directory", 0),
        ("out/notes.txt", "file", 11),
    ]
    inner = run_tool(runtime, "artifacts.list", {"path": "out"}, scope=scope)
    assert [e.path for e in inner.entries] == ["out/notes.txt"]

    text = run_tool(runtime, "artifacts.read", {"path": "out/notes.txt"}, scope=scope)
    assert (text.content, text.offset, text.next_offset, text.size, text.truncated) == (
        "héllo\nmore",
        0,
        11,
        11,
        False,
    )
    tail = run_tool(runtime, "artifacts.read", {"path": "out/notes.txt", "offset": 7}, scope=scope)
    assert (tail.content, tail.next_offset) == ("more", 11)
    blob = run_tool(runtime, "artifacts.read", {"path": "blob.bin", "encoding": "base64"}, scope=scope)
    assert base64.b64decode(blob.content) == raw
    # Replacing, not appending, leaves only the new content.
    run_tool(runtime, "artifacts.write", {"path": "out/notes.txt", "content": "new"}, scope=scope)
    assert (work / "out" / "notes.txt").read_text() == "new"


@pytest.mark.parametrize("encoding", ["text", "base64"])
def test_a_large_file_is_read_in_parts_that_each_fit(
    runtime: Runtime, task: Task, work: Path, encoding: str
) -> None:
    # Characters of 1 to 4 bytes, and ones JSON escapes (a quote, a newline, a control character).
    content = ('aé€😀"\n\x01' * 600).encode()
    (work / "big.txt").write_bytes(content)
    read, offset, parts = b"", 0, 0
    while True:
        part = run_tool(
            runtime,
            "artifacts.read",
            {"path": "big.txt", "offset": offset, "encoding": encoding},
            scope=job_scope(task.id),
            limit=1024,
        )
        assert part.offset == offset
        read += part.content.encode() if encoding == "text" else base64.b64decode(part.content)
        assert part.next_offset == len(read)
        offset, parts = part.next_offset, parts + 1
        if offset == part.size:
            assert not part.truncated
            break
        assert part.truncated
    assert read == content
    assert parts > 10


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/etc/passwd", "is absolute"),
        ("../escape", "climbs out"),
        ("out/../../escape", "climbs out"),
        ("a\0b", "NUL byte"),
        ("", "the work directory itself"),
        (".", "the work directory itself"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_a_path_outside_the_work_directory_is_refused(
    runtime: Runtime, task: Task, path: str, said: str
) -> None:
    for tool, extra in (("artifacts.read", {}), ("artifacts.write", {"content": "x"})):
        with pytest.raises(InvalidInput, match=said):
            run_tool(runtime, tool, {"path": path, **extra}, scope=job_scope(task.id))


def test_a_link_out_of_the_work_directory_is_refused_a_link_inside_is_followed(
    runtime: Runtime, task: Task, work: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not yours")
    (work / "out").symlink_to(outside)
    (work / "passwd").symlink_to("/etc/passwd")
    scope = job_scope(task.id)
    for path in ("out/secret", "passwd"):
        with pytest.raises(Forbidden, match="leads out of the job's work directory"):
            run_tool(runtime, "artifacts.read", {"path": path}, scope=scope)
    with pytest.raises(Forbidden, match="leads out"):
        run_tool(runtime, "artifacts.write", {"path": "out/new", "content": "x"}, scope=scope)
    with pytest.raises(Forbidden, match="leads out"):
        run_tool(runtime, "artifacts.list", {"path": "out"}, scope=scope)
    assert sorted(os.listdir(outside)) == ["secret"]
    # The listing shows the links as links, and does not go through them.
    listed = run_tool(runtime, "artifacts.list", {}, scope=scope)
    assert [(e.path, e.type) for e in listed.entries] == [("out", "link"), ("passwd", "link")]

    (work / "real.txt").write_text("inside")
    (work / "alias").symlink_to("real.txt")
    assert run_tool(runtime, "artifacts.read", {"path": "alias"}, scope=scope).content == "inside"


def test_what_is_not_there_or_not_a_file_is_refused(runtime: Runtime, task: Task, work: Path) -> None:
    scope = job_scope(task.id)
    (work / "dir").mkdir()
    (work / "file").write_text("12345")
    with pytest.raises(NotFound, match="'missing' is not in the job's work directory") as missing:
        run_tool(runtime, "artifacts.read", {"path": "missing"}, scope=scope)
    assert missing.value.hint == "list the files with artifacts.list"
    with pytest.raises(NotFound):
        run_tool(runtime, "artifacts.list", {"path": "nowhere"}, scope=scope)
    os.mkfifo(work / "pipe")
    with pytest.raises(InvalidInput, match="'pipe' is not a file"):  # and no writer holds the call
        run_tool(runtime, "artifacts.read", {"path": "pipe"}, scope=scope)
    with pytest.raises(InvalidInput, match="'pipe' cannot be opened in the job's work directory"):
        run_tool(runtime, "artifacts.write", {"path": "pipe", "content": "x"}, scope=scope)
    (work / "twin").hardlink_to(work / "file")
    with pytest.raises(Forbidden, match="'twin' has other hard links"):
        run_tool(runtime, "artifacts.write", {"path": "twin", "content": "x"}, scope=scope)
    with pytest.raises(Forbidden, match="'file' has other hard links"):
        run_tool(runtime, "artifacts.read", {"path": "file"}, scope=scope)
    (work / "twin").unlink()
    with pytest.raises(InvalidInput, match="'dir' is not a file"):
        run_tool(runtime, "artifacts.read", {"path": "dir"}, scope=scope)
    with pytest.raises(InvalidInput, match="'dir' is a directory"):
        run_tool(runtime, "artifacts.write", {"path": "dir", "content": "x"}, scope=scope)
    with pytest.raises(InvalidInput, match="'file' in the path 'file/x' is not a directory"):
        run_tool(runtime, "artifacts.read", {"path": "file/x"}, scope=scope)
    with pytest.raises(InvalidInput, match="offset 6 is past the end of 'file' \\(5 bytes\\)"):
        run_tool(runtime, "artifacts.read", {"path": "file", "offset": 6}, scope=scope)
    assert run_tool(runtime, "artifacts.read", {"path": "file", "offset": 5}, scope=scope).content == ""


def test_bytes_that_are_not_utf8_are_read_as_base64_only(runtime: Runtime, task: Task, work: Path) -> None:
    scope = job_scope(task.id)
    (work / "bin").write_bytes(b"ok\xff\xfe")
    with pytest.raises(InvalidInput, match="'bin' is not UTF-8 text at byte 2") as refused:
        run_tool(runtime, "artifacts.read", {"path": "bin"}, scope=scope)
    assert refused.value.hint == 'read it with encoding "base64"'
    # A file that ends inside a character is not text either (its end never comes).
    (work / "cut").write_bytes("é".encode()[:1])
    with pytest.raises(InvalidInput, match="not UTF-8 text at byte 0"):
        run_tool(runtime, "artifacts.read", {"path": "cut"}, scope=scope)
    bad = {"path": "x", "content": "not base64!", "encoding": "base64"}
    with pytest.raises(InvalidInput, match="the content is not base64"):
        run_tool(runtime, "artifacts.write", bad, scope=scope)


def test_a_write_holds_at_most_the_tasks_file_size_limit(runtime: Runtime) -> None:
    task = make_task(runtime, file_size_bytes=10)
    scope = job_scope(task.id)
    run_tool(runtime, "artifacts.write", {"path": "f", "content": "0123456789"}, scope=scope)
    with pytest.raises(BodyTooLarge, match="larger than the limit of 10 bytes") as refused:
        run_tool(runtime, "artifacts.write", {"path": "g", "content": "0123456789a"}, scope=scope)
    assert "tasks.limits.file_size_bytes" in (refused.value.hint or "")
    with pytest.raises(BodyTooLarge):
        run_tool(runtime, "artifacts.write", {"path": "f", "content": "a", "append": True}, scope=scope)
    assert (runtime.tasks.task_dir(task.id) / "work" / "f").read_text() == "0123456789"
    assert not (runtime.tasks.task_dir(task.id) / "work" / "g").exists()


def test_only_a_jobs_call_reaches_a_work_directory(runtime: Runtime, task: Task) -> None:
    with pytest.raises(Forbidden, match="only a task's job may call them"):
        run_tool(runtime, "artifacts.list", {})
    ghost = TaskScope(task_id="0" * 32, run_id="1", job_id="j")
    with pytest.raises(TaskNotFound):
        run_tool(runtime, "artifacts.list", {}, scope=ghost)


def test_a_work_directory_on_a_worker_or_another_server_is_refused(runtime: Runtime, task: Task) -> None:
    later = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    runtime.store.update_task(task.id, state="running", lease_owner="node:n1", lease_expires_at=later)
    with pytest.raises(TaskElsewhere, match="runs on worker node n1: its work directory is there") as refused:
        run_tool(runtime, "artifacts.read", {"path": "x"}, scope=job_scope(task.id))
    assert refused.value.hint == "read and write the files in /work from the job itself"

    other = make_task(runtime)
    claimed = runtime.store.claim_task(owner="elsewhere:1", lease_expires_at=later, server="s2")
    assert claimed is not None
    assert claimed.id == other.id
    with pytest.raises(TaskElsewhere, match="runs on server s2, which shares this database"):
        run_tool(runtime, "artifacts.write", {"path": "x", "content": "y"}, scope=job_scope(other.id))


def test_a_link_put_in_place_after_the_path_was_resolved_is_not_followed(work: Path, tmp_path: Path) -> None:
    # The walk the tools make once a path is resolved: a link there now (the job raced the check)
    # is refused, not followed.
    (work / "out").symlink_to(tmp_path)

    def walk() -> None:
        with _directory(work, ["out"], "out/x"):
            pass

    with pytest.raises(InvalidInput, match="'out' in the path 'out/x' is not a directory"):
        walk()
