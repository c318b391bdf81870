"""MCP tools: artifacts. ``artifacts.list``, ``artifacts.read`` and ``artifacts.write`` on the
calling job's own work directory (``<data>/tasks/<id>/work``, the job's ``/work``), and nowhere
else: only a task's job calls them (``call.scope``, checked by the gateway), and its task names
the directory.

Paths are relative to the work directory: an absolute path, ``..`` or a NUL byte is refused, and
a path whose symbolic links lead out of the directory is refused once resolved. The resolved path
is then opened one component at a time without following links, so a link the job puts in place
meanwhile is refused, not followed.

Reads answer at most ``mcp.max_result_bytes`` from an offset (``truncated`` and ``next_offset``
page through the rest); a write holds at most the task's ``file_size_bytes`` limit, the most a job
may write to one file itself. Content is UTF-8 text or base64. A task a worker runs has its work
directory on that worker: refused here.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
from pydantic import BaseModel, Field

from appliance.errors import BodyTooLarge, Forbidden, InvalidInput, NotFound, TaskElsewhere, TaskNotFound
from appliance.identity import TaskScope
from appliance.mcp.limits import answer_bytes, fit_list, fit_text
from appliance.mcp.types import Tool, ToolCall, ToolInput, ToolOutput
from appliance.tasks.records import job_limits

__all__ = ["TOOLS", "ListIn", "ListOut", "ReadIn", "ReadOut", "WriteIn", "WriteOut"]

Encoding = Literal["text", "base64"]
PATH_DESCRIPTION = "Relative to the job's /work; no '..', no absolute path."
MAX_NAME_BYTES = 255
# A link is never followed; a pipe the job put there must not hold the call (it is then refused).
_OPEN_FILE = os.O_NOFOLLOW | os.O_NONBLOCK
_NODE_PREFIX = "node:"  # the lease owner of a task a worker runs (tasks.remote.node_owner)


class ListIn(ToolInput):
    path: str = Field(default=".", description=f"The directory to list. {PATH_DESCRIPTION}")


class Entry(BaseModel):
    path: str = Field(description="Relative to the job's /work.")
    type: Literal["file", "directory", "link", "other"]
    size: int = Field(description="In bytes (a file's; 0 for the rest).")


class ListOut(ToolOutput):
    entries: list[Entry] = Field(
        description="What the directory holds, its subdirectories' content included, in path order."
    )


class ReadIn(ToolInput):
    path: str = Field(description=f"The file to read. {PATH_DESCRIPTION}")
    offset: int = Field(default=0, ge=0, description="Bytes into the file to start from.")
    encoding: Encoding = Field(default="text", description="text (UTF-8) or base64 (any bytes).")


class ReadOut(ToolOutput):
    path: str
    encoding: Encoding
    offset: int
    next_offset: int = Field(description="The offset to ask for next; at size, the file is read.")
    size: int = Field(description="The file's size in bytes.")
    content: str


class WriteIn(ToolInput):
    path: str = Field(description=f"The file to write (its directories are made). {PATH_DESCRIPTION}")
    content: str = Field(description="What to write, as text (UTF-8) or base64.")
    encoding: Encoding = Field(default="text")
    append: bool = Field(default=False, description="Add to the end of the file instead of replacing it.")


class WriteOut(ToolOutput):
    path: str
    written: int = Field(description="Bytes written.")
    size: int = Field(description="The file's size now, in bytes.")


# -- the work directory and paths in it -------------------------------------------------------


def _work_dir(call: ToolCall) -> tuple[Path, int]:
    """The calling job's work directory, and the most one file there may hold."""
    scope: TaskScope | None = call.scope
    if scope is None:
        raise Forbidden(
            "artifacts tools act on the calling job's own work directory: only a task's job may call them",
            hint="read a task's output with tasks.output instead",
        )
    tasks = call.runtime.tasks
    task = tasks.store.get_task(scope.task_id)
    if task is None:
        raise TaskNotFound(f"task {scope.task_id} not found")
    owner = task.lease_owner or ""
    if owner.startswith(_NODE_PREFIX):
        raise TaskElsewhere(
            f"task {task.id} runs on worker node {owner.removeprefix(_NODE_PREFIX)}: its work directory"
            " is there, not on this server",
            hint="read and write the files in /work from the job itself",
        )
    if task.ran_on is not None and task.ran_on != tasks.server:
        raise TaskElsewhere(
            f"task {task.id} runs on server {task.ran_on}, which shares this database: its work"
            " directory is in that server's data dir",
            hint="read and write the files in /work from the job itself",
        )
    work = tasks.task_dir(task.id) / "work"
    if not work.is_dir():
        raise NotFound(f"task {task.id} has no work directory on this server", hint="create a new task")
    most = job_limits(task).get("file_size_bytes", call.runtime.settings.tasks.limits.file_size_bytes)
    return work, int(most)


def _parts(path: str, *, file: bool) -> list[str]:
    """``path``'s components, refused when it is absolute, climbs with ``..`` or is not a name."""
    if "\0" in path:
        raise InvalidInput(f"the path {path!r} holds a NUL byte", hint="send a path without NUL bytes")
    if path.startswith("/"):
        raise InvalidInput(
            f"the path {path!r} is absolute", hint="name it relative to the job's /work, e.g. out/result.txt"
        )
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(
            f"the path {path!r} climbs out with '..'", hint="name a path inside the job's /work, without '..'"
        )
    if any(len(part.encode()) > MAX_NAME_BYTES for part in parts):
        raise InvalidInput(f"the path {path!r} has a name longer than {MAX_NAME_BYTES} bytes")
    if file and not parts:
        raise InvalidInput(f"the path {path!r} names the work directory itself", hint="name a file in it")
    return parts


def _resolved(work: Path, parts: list[str], path: str) -> list[str]:
    """``parts`` with the links among them followed, refused when that leads out of ``work``."""
    root = work.resolve()
    target = root.joinpath(*parts).resolve()
    if not target.is_relative_to(root):
        raise Forbidden(
            f"the path {path!r} leads out of the job's work directory through a symbolic link",
            hint="read and write files inside /work only",
        )
    return list(target.relative_to(root).parts)


@contextmanager
def _directory(work: Path, parts: list[str], path: str, *, make: bool = False) -> Iterator[int]:
    """A descriptor of the directory ``parts`` name under ``work``, opened without following any
    link; ``make`` makes the missing ones (owned as the work directory is)."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            if make:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    _hand_over(fd, part)
                except FileExistsError:
                    pass
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError as exc:
                raise NotFound(f"{path!r} is not in the job's work directory") from exc
            except OSError as exc:  # ENOTDIR, or ELOOP: a link put there since it was resolved
                raise InvalidInput(f"{part!r} in the path {path!r} is not a directory") from exc
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _check_file(info: os.stat_result, path: str) -> None:
    """A plain file of the work directory's own: not a directory or a pipe, and no hard link to a
    file elsewhere (this process may write where the job may not)."""
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInput(
            f"{path!r} is not a file", hint="name a plain file; list a directory with artifacts.list"
        )
    if info.st_nlink > 1:
        raise Forbidden(
            f"{path!r} has other hard links: it may be a file outside the job's work directory",
            hint="copy the file in /work instead of linking it",
        )


def _unopenable(path: str, exc: OSError) -> InvalidInput:
    return InvalidInput(
        f"{path!r} cannot be opened in the job's work directory: {exc.strerror}",
        hint="name a plain file inside /work (links are not followed)",
    )


def _hand_over(directory: int, name: str) -> None:
    """As root, jobs run as another user (nobody): what is made for them is theirs, as the work
    directory is."""
    if os.geteuid() != 0:
        return
    owner = os.fstat(directory)
    os.chown(name, owner.st_uid, owner.st_gid, dir_fd=directory, follow_symlinks=False)


# -- the tools ----------------------------------------------------------------------------------


async def list_entries(call: ToolCall, arguments: ListIn) -> ListOut:
    def walk() -> ListOut:
        work, _ = _work_dir(call)
        parts = _resolved(work, _parts(arguments.path, file=False), arguments.path)
        with _directory(work, parts, arguments.path) as directory:
            entries = list(_entries(directory, "/".join(parts)))
        return ListOut(entries=sorted(entries, key=lambda entry: entry.path))

    return await anyio.to_thread.run_sync(walk)


def _entries(directory: int, prefix: str) -> Iterator[Entry]:
    """Everything under the open ``directory``, by descriptors: a link is listed, never followed."""
    for root, dirs, files, root_fd in os.fwalk(".", dir_fd=directory):
        for name in dirs + files:
            try:
                info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:  # the job removed it meanwhile
                continue
            path = os.path.normpath(os.path.join(prefix, root, name))
            if stat.S_ISLNK(info.st_mode):
                yield Entry(path=path, type="link", size=0)
            elif stat.S_ISDIR(info.st_mode):
                yield Entry(path=path, type="directory", size=0)
            elif stat.S_ISREG(info.st_mode):
                yield Entry(path=path, type="file", size=info.st_size)
            else:
                yield Entry(path=path, type="other", size=0)


async def read(call: ToolCall, arguments: ReadIn) -> ReadOut:
    def load() -> ReadOut:
        work, _ = _work_dir(call)
        parts = _resolved(work, _parts(arguments.path, file=True), arguments.path)
        with _directory(work, parts[:-1], arguments.path) as directory:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | _OPEN_FILE, dir_fd=directory)
            except FileNotFoundError as exc:
                raise NotFound(
                    f"{arguments.path!r} is not in the job's work directory",
                    hint="list the files with artifacts.list",
                ) from exc
            except OSError as exc:  # ELOOP: a link put there since the path was resolved
                raise _unopenable(arguments.path, exc) from exc
            try:
                info = os.fstat(fd)
                _check_file(info, arguments.path)
                if arguments.offset > info.st_size:
                    raise InvalidInput(
                        f"offset {arguments.offset} is past the end of {arguments.path!r}"
                        f" ({info.st_size} bytes)",
                        hint="ask from the next_offset of the last answer, or from 0",
                    )
                wanted = min(call.max_result_bytes, info.st_size - arguments.offset)
                data = os.pread(fd, wanted, arguments.offset)
            finally:
                os.close(fd)
        at_end = arguments.offset + len(data) >= info.st_size
        content = _encode(data, arguments, at_end=at_end)
        kept = len(content.encode()) if arguments.encoding == "text" else len(data)
        return ReadOut(
            path="/".join(parts),
            encoding=arguments.encoding,
            offset=arguments.offset,
            next_offset=arguments.offset + kept,
            size=info.st_size,
            content=content,
            truncated=arguments.offset + kept < info.st_size,
        )

    return await anyio.to_thread.run_sync(load)


def _encode(data: bytes, arguments: ReadIn, *, at_end: bool) -> str:
    if arguments.encoding == "base64":
        return base64.b64encode(data).decode()
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        # A character the read cut in two comes whole in the next part; anything else is not text.
        if exc.reason == "unexpected end of data" and not at_end:
            return data[: exc.start].decode()
        raise InvalidInput(
            f"{arguments.path!r} is not UTF-8 text at byte {arguments.offset + exc.start}",
            hint='read it with encoding "base64"',
        ) from exc


async def write(call: ToolCall, arguments: WriteIn) -> WriteOut:
    data = _decode(arguments)

    def store() -> WriteOut:
        work, most = _work_dir(call)
        parts = _resolved(work, _parts(arguments.path, file=True), arguments.path)
        if len(data) > most:
            raise BodyTooLarge(most, what="the file", setting="tasks.limits.file_size_bytes")
        with _directory(work, parts[:-1], arguments.path, make=True) as directory:
            flags = os.O_WRONLY | os.O_CREAT | _OPEN_FILE | (os.O_APPEND if arguments.append else 0)
            try:
                fd = os.open(parts[-1], flags, 0o644, dir_fd=directory)
            except IsADirectoryError as exc:
                raise InvalidInput(f"{arguments.path!r} is a directory", hint="name a file") from exc
            except OSError as exc:
                raise _unopenable(arguments.path, exc) from exc
            try:
                _check_file(os.fstat(fd), arguments.path)
                if arguments.append and os.fstat(fd).st_size + len(data) > most:
                    raise BodyTooLarge(most, what="the file", setting="tasks.limits.file_size_bytes")
                if not arguments.append:
                    os.ftruncate(fd, 0)
                _write_all(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            _hand_over(directory, parts[-1])
        return WriteOut(path="/".join(parts), written=len(data), size=size)

    return await anyio.to_thread.run_sync(store)


def _decode(arguments: WriteIn) -> bytes:
    if arguments.encoding == "text":
        return arguments.content.encode()
    try:
        return base64.b64decode(arguments.content, validate=True)
    except binascii.Error as exc:
        raise InvalidInput(
            f"the content is not base64: {exc}", hint='send text with encoding "text"'
        ) from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fit_list(answer: ListOut, limit: int) -> ListOut:
    return fit_list(answer, "entries", limit)


def _fit_read(answer: ReadOut, limit: int) -> ReadOut:
    if answer.encoding == "text":
        cut = fit_text(answer, "content", limit)
        kept = len(cut.content.encode())
    else:
        # base64 has nothing JSON escapes: what is left past the rest of the answer, in whole quanta.
        empty = answer.model_copy(update={"content": "", "truncated": True})
        kept = max(limit - answer_bytes(empty), 0) // 4 * 3
        data = base64.b64decode(answer.content)[:kept]
        cut = empty.model_copy(update={"content": base64.b64encode(data).decode()})
    # A smaller number: the answer only gets shorter.
    return cut.model_copy(update={"next_offset": answer.offset + kept})


TOOLS: list[Tool[Any, Any]] = [
    Tool(
        name="artifacts.list",
        title="List the job's files",
        description="The files and directories in the calling job's own /work (or a directory in it), "
        "with their sizes. Only a task's job may call it.",
        input=ListIn,
        output=ListOut,
        run=list_entries,
        fit=_fit_list,
    ),
    Tool(
        name="artifacts.read",
        title="Read a file of the job's",
        description="A file in the calling job's own /work, as text or base64, from a byte offset; a "
        "large file comes in parts (truncated set): ask again from next_offset.",
        input=ReadIn,
        output=ReadOut,
        run=read,
        fit=_fit_read,
    ),
    Tool(
        name="artifacts.write",
        title="Write a file of the job's",
        description="Write (or append to) a file in the calling job's own /work, as text or base64, "
        "up to the task's file size limit; its directories are made.",
        input=WriteIn,
        output=WriteOut,
        run=write,
    ),
]
