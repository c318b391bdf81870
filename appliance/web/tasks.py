"""``/api/v1/tasks``: hand the appliance a prompt, a script or commands, follow it, cancel it.

``POST`` takes JSON (``NewTask``) or a form (``multipart/form-data``, or URL-encoded without
files): the same fields as form fields
(``limits`` as a JSON object), and files in ``attachment`` fields, each saved in the task's
``/work`` under its file name. A body past ``server.max_body_bytes``, or attachments past
``tasks.max_attachment_bytes``, get 413 naming the limit.

Imports: the task service, audit and the web helpers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State, UploadFile
from litestar.di import Provide
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from pydantic import ValidationError

from appliance.audit import Context
from appliance.errors import InvalidInput
from appliance.runtime import Runtime
from appliance.tasks.service import Attachment, NewTask, TaskEvent, TaskOut, TaskService, TaskState
from appliance.web.bodies import parse_body
from appliance.web.errors import ErrorInfo, error_tail, problem_body

__all__ = ["TasksController"]

TASK_STATES = ("queued", "running", "succeeded", "failed", "canceled")
FORM_FIELDS = ("mode", "text", "model", "idempotency_key", "limits", "inference", "tools")


def provide_tasks(state: State) -> TaskService:
    runtime: Runtime = state.runtime
    return runtime.tasks


class TasksController(Controller):
    path = "/api/v1/tasks"
    tags = ["tasks"]  # noqa: RUF012 (Litestar reads it as a class attribute)
    dependencies = {"tasks": Provide(provide_tasks, sync_to_thread=False)}  # noqa: RUF012

    @post("/", status_code=201)
    async def create_task(
        self, request: Request[Any, Any, Any], tasks: TaskService, context: Context
    ) -> Response[dict[str, Any]]:
        """Queue a task: JSON {mode, text, model, limits, idempotency_key, inference}, or the same as
        multipart form fields with files in `attachment` fields. 201 with the task; 200 with the
        first one when its idempotency key was sent before."""
        content_type = request.headers.get("content-type", "")
        attachments: list[Attachment] = []
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            new, attachments = await _from_form(request)
        else:
            new = parse_body(NewTask, await request.body())
        key = request.headers.get("idempotency-key")
        if key and new.idempotency_key is None:
            new = new.model_copy(update={"idempotency_key": key})
        task, added = await anyio.to_thread.run_sync(lambda: tasks.create(new, attachments, context))
        return Response(TaskOut.of(task).model_dump(mode="json"), status_code=201 if added else 200)

    @get("/", sync_to_thread=True)
    def list_tasks(
        self,
        tasks: TaskService,
        context: Context,
        states: Annotated[
            list[str] | None,
            Parameter(query="state", schema_extra={"items": {"type": "string", "enum": list(TASK_STATES)}}),
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> list[TaskOut]:
        """Tasks, newest first: your own, or everyone's for an admin; `?state=running`
        (repeatable) filters."""
        wanted = states or []
        unknown = [state for state in wanted if state not in TASK_STATES]
        if unknown:
            raise InvalidInput(
                f"{unknown[0]!r} is not a task state", hint=f"use one of {', '.join(TASK_STATES)}"
            )
        found = tasks.list_tasks(context.who, states=cast("list[TaskState]", wanted), limit=limit)
        return [TaskOut.of(task) for task in found]

    @get("/{task_id:str}", sync_to_thread=True)
    def show_task(self, task_id: str, tasks: TaskService, context: Context) -> TaskOut:
        """One task: its state, attempts, limits and result (exit code, signal, duration, peak
        memory, reason)."""
        return TaskOut.of(tasks.get(task_id, context.who))

    @get("/{task_id:str}/events")
    async def task_events(self, task_id: str, tasks: TaskService, context: Context) -> ServerSentEvent:
        """Server-sent events: `state` (the task) when it changes, `output` ({stream, text}) as it
        comes, then `end` (the task as it ended), after which the stream closes."""
        await anyio.to_thread.run_sync(lambda: tasks.get(task_id, context.who))  # 404 before the stream

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            async for event in tasks.follow(task_id, context.who):
                yield _message(event)

        def error(info: ErrorInfo) -> ServerSentEventMessage:
            return ServerSentEventMessage(data=json.dumps(problem_body(info)), event="error")

        return ServerSentEvent(error_tail(events(), error, where=f"GET /api/v1/tasks/{task_id}/events"))

    @get("/{task_id:str}/output", sync_to_thread=True)
    def task_output(self, task_id: str, tasks: TaskService, context: Context) -> dict[str, str]:
        """What the task printed so far: {stdout, stderr} (a prompt's answer is its stdout)."""
        tasks.get(task_id, context.who)
        return {stream: tasks.output(task_id, stream) for stream in ("stdout", "stderr")}

    @post("/{task_id:str}/cancel", sync_to_thread=True, status_code=200)
    def cancel_task(self, task_id: str, tasks: TaskService, context: Context) -> TaskOut:
        """Stop a queued or running task; 409 task_finished once it has ended."""
        return TaskOut.of(tasks.cancel(task_id, context))


def _message(event: TaskEvent) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=json.dumps(event.data), event=event.kind)


async def _from_form(request: Request[Any, Any, Any]) -> tuple[NewTask, list[Attachment]]:
    form = await request.form()
    fields: dict[str, Any] = {}
    attachments = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "attachment":
                raise InvalidInput(
                    f"the file in the form field {name!r} is not expected", hint="send files as attachment"
                )
            attachments.append(Attachment(value.filename or "", await value.read()))
        elif name not in FORM_FIELDS:
            raise InvalidInput(
                f"{name!r} is not a task field", hint=f"send {', '.join(FORM_FIELDS)} and attachment files"
            )
        elif name == "limits":
            try:
                fields[name] = json.loads(value)
            except ValueError as exc:
                raise InvalidInput(
                    "limits is not JSON", hint='send it as a JSON object, e.g. {"timeout_seconds": 60}'
                ) from exc
        elif name == "tools":  # repeated, or names separated by commas
            fields.setdefault(name, []).extend(tool.strip() for tool in value.split(",") if tool.strip())
        else:
            fields[name] = value
    try:
        return NewTask.model_validate(fields), attachments
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "form"
        raise InvalidInput(f"invalid request: {where}: {first['msg']}") from exc
