"""MCP tools: tasks. ``tasks.create``, ``tasks.get`` and ``tasks.output`` through the task service
with the caller's own context: a user reaches only their own tasks (a job: the tasks it made), and
the service's rules on limits and tool grants apply as on ``/api/v1/tasks``.

``tasks.output`` reads a stream from a byte offset (into its UTF-8 text) and answers with the next
offset to ask for, so a caller pages through output larger than one answer may hold.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio.to_thread
from pydantic import Field

from appliance.errors import InvalidInput
from appliance.mcp.limits import fit_text
from appliance.mcp.types import Tool, ToolCall, ToolInput, ToolOutput
from appliance.store.base import FINISHED_TASK_STATES, Task
from appliance.tasks.records import TaskOut
from appliance.tasks.service import NewTask

__all__ = ["TOOLS", "OutputIn", "OutputOut", "TaskAnswer", "TaskCreateIn", "TaskGetIn"]


class TaskCreateIn(NewTask, ToolInput):
    """A task to queue, as ``POST /api/v1/tasks`` takes it in JSON (no attachments here)."""


class TaskGetIn(ToolInput):
    task_id: str = Field(min_length=1, description="The task's id, as tasks.create answered.")


class TaskAnswer(ToolOutput):
    """A task as ``tasks.get`` shows it (``text`` may be cut to fit, with truncated)."""

    id: str
    mode: str
    state: str = Field(description="queued, running, succeeded, failed, canceled...")
    finished: bool = Field(description="The task has ended: its state will not change again.")
    model: str | None
    actor: str
    attempts: int
    inference: bool
    tools: list[str]
    limits: dict[str, Any]
    result: dict[str, Any] | None = Field(description="Exit code, duration, reason... once it ended.")
    created_at: str
    started_at: str | None
    finished_at: str | None
    text: str

    @classmethod
    def of(cls, task: Task) -> TaskAnswer:
        shown = TaskOut.of(task).model_dump(exclude={"idempotency_key"})
        return cls(**shown, finished=task.state in FINISHED_TASK_STATES)


class OutputIn(ToolInput):
    task_id: str = Field(min_length=1)
    stream: Literal["stdout", "stderr"] = Field(default="stdout")
    offset: int = Field(default=0, ge=0, description="Bytes into the stream's UTF-8 text to start from.")


class OutputOut(ToolOutput):
    task_id: str
    stream: str
    offset: int = Field(description="Where this text starts, in bytes (moved past a split character).")
    next_offset: int = Field(description="The offset to ask for next.")
    size: int = Field(description="The stream's size so far, in bytes.")
    finished: bool = Field(description="The task has ended: past size, nothing more will come.")
    text: str


async def create(call: ToolCall, arguments: TaskCreateIn) -> TaskAnswer:
    request = NewTask(**arguments.model_dump())
    task, _ = await anyio.to_thread.run_sync(lambda: call.runtime.tasks.create(request, (), call.context))
    return TaskAnswer.of(task)


async def get(call: ToolCall, arguments: TaskGetIn) -> TaskAnswer:
    task = await anyio.to_thread.run_sync(lambda: call.runtime.tasks.get(arguments.task_id, call.context.who))
    return TaskAnswer.of(task)


async def output(call: ToolCall, arguments: OutputIn) -> OutputOut:
    tasks = call.runtime.tasks

    def read() -> tuple[Task, bytes]:
        task = tasks.get(arguments.task_id, call.context.who)  # TaskNotFound: not theirs
        return task, tasks.output(task.id, arguments.stream).encode()

    task, data = await anyio.to_thread.run_sync(read)
    offset = arguments.offset
    if offset > len(data):
        raise InvalidInput(
            f"offset {offset} is past the end of the task's {arguments.stream} ({len(data)} bytes so far)",
            hint="ask from the next_offset of the last answer, or from 0",
        )
    while offset < len(data) and data[offset] & 0xC0 == 0x80:  # inside a character: from the next one
        offset += 1
    text = data[offset:].decode()
    return OutputOut(
        task_id=task.id,
        stream=arguments.stream,
        offset=offset,
        next_offset=len(data),
        size=len(data),
        finished=task.state in FINISHED_TASK_STATES,
        text=text,
    )


def _fit_task(answer: TaskAnswer, limit: int) -> TaskAnswer:
    return fit_text(answer, "text", limit)


def _fit_output(answer: OutputOut, limit: int) -> OutputOut:
    cut = fit_text(answer, "text", limit)
    # A smaller number: the answer only gets shorter.
    return cut.model_copy(update={"next_offset": cut.offset + len(cut.text.encode())})


TOOLS: list[Tool[Any, Any]] = [
    Tool(
        name="tasks.create",
        title="Create a task",
        description="Queue a prompt for a model, or a script or commands for the sandbox; with auth "
        "on, the task is the caller's own. Answers the task (its id for tasks.get and tasks.output).",
        input=TaskCreateIn,
        output=TaskAnswer,
        run=create,
        fit=_fit_task,
    ),
    Tool(
        name="tasks.get",
        title="Show a task",
        description="A task's state and, once it ended, its result (exit code, duration, reason).",
        input=TaskGetIn,
        output=TaskAnswer,
        run=get,
        fit=_fit_task,
    ),
    Tool(
        name="tasks.output",
        title="Read a task's output",
        description="What a task printed on stdout or stderr, from a byte offset; a long output comes "
        "in parts (truncated set): ask again from next_offset.",
        input=OutputIn,
        output=OutputOut,
        run=output,
        fit=_fit_output,
    ),
]
