"""``/api/v1/cluster/tasks``: a worker node claims a script or commands task and runs it.

Every route takes a node credential (as every ``/api/v1/cluster`` route does) and acts as that
node; all but ``claim`` only for a task whose lease the node holds (409 ``lease_lost`` else, 403
for an attachment), so a node thought dead cannot touch a task that has moved on. Output, renew and
finish name the attempt the claim handed out (``?attempt=N``, required) and are refused (409
``lease_lost``) for any other, so a late call from a node's earlier job of a task that came back to
it cannot touch the new attempt:

    POST /claim                        {} -> {"task": null | NodeTask}  (its "attempt" included)
    GET  /{id}/attachments/{name}      a file of the task's /work
    POST /{id}/output?attempt=N        NDJSON body, streamed: {"stream": "stdout"|"stderr", "text"}
                                       per line, appended and passed to followers as it comes
    POST /{id}/renew?attempt=N         -> {"lease_expires_at"}; 409: stop the job at once
    POST /{id}/finish?attempt=N        {"state", "result"} -> {"state", "duplicate"}

The server wakes its ready nodes with a ``tasks`` item on the work channel when a task they may
take is queued (``cluster_tasks_lifespan`` hooks the task service to the channel); nodes also claim
every few seconds.

Imports: the task service, the cluster's service and channel, errors and the web helpers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

import anyio
from litestar import Controller, Litestar, Request, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.params import Parameter
from litestar.response import File

from appliance.cluster.service import Node
from appliance.errors import InvalidInput
from appliance.runtime import Runtime
from appliance.tasks.output import StreamName
from appliance.tasks.service import NodeFinish, TaskService
from appliance.web.bodies import parse_body

__all__ = ["MAX_OUTPUT_LINE_BYTES", "ClusterTasksController", "cluster_tasks_lifespan"]

MAX_OUTPUT_LINE_BYTES = 1024 * 1024  # one output line; a job's output is cut far below it anyway
STREAMS = ("stdout", "stderr")
# Optional in the signature so that a call without a node credential is 401 before it is 400.
Attempt = Annotated[int | None, Parameter(ge=1, description="the attempt the claim handed out")]


def _attempt(attempt: int | None) -> int:
    if attempt is None:
        raise InvalidInput(
            "this route needs ?attempt=N", hint="send the attempt number the claim handed out with the task"
        )
    return attempt


def provide_tasks(state: State) -> TaskService:
    runtime: Runtime = state.runtime
    return runtime.tasks


@asynccontextmanager
async def cluster_tasks_lifespan(app: Litestar) -> AsyncIterator[None]:
    """While the server runs: a task queued for nodes wakes the ready ones (after the runtime opened)."""
    runtime: Runtime = app.state.runtime
    channel, loop = runtime.channel, asyncio.get_running_loop()
    assert channel is not None, "the server always opens the runtime with its channel"

    def offer() -> None:  # on any thread; the channel lives on the loop
        for node in runtime.cluster.available_nodes():
            loop.call_soon_threadsafe(channel.announce_tasks, node.id)

    runtime.tasks.on_queued = offer
    try:
        yield
    finally:
        runtime.tasks.on_queued = None


class ClusterTasksController(Controller):
    path = "/api/v1/cluster/tasks"
    tags = ["cluster"]  # noqa: RUF012 (Litestar reads it as a class attribute)
    dependencies = {"tasks": Provide(provide_tasks, sync_to_thread=False)}  # noqa: RUF012

    @post("/claim", status_code=200)
    async def claim(self, tasks: TaskService, node: Node) -> dict[str, Any]:
        """The oldest queued script or commands task, leased to this node, or `{"task": null}`."""
        task = await anyio.to_thread.run_sync(
            lambda: tasks.claim_for_node(node.id, node.capabilities, drained=node.drained)
        )
        return {"task": task.model_dump(mode="json") if task is not None else None}

    @get("/{task_id:str}/attachments/{name:str}", sync_to_thread=True)
    def attachment(self, task_id: str, name: str, tasks: TaskService, node: Node) -> File:
        """One of the task's attachments (a file of its /work), for the node holding its lease."""
        path = tasks.node_attachment(task_id, node.id, name)
        return File(
            path=path,
            filename=name,
            media_type="application/octet-stream",
            content_disposition_type="attachment",
        )

    @post("/{task_id:str}/output", status_code=200, request_max_body_size=None)
    async def output(
        self,
        task_id: str,
        request: Request[Any, Any, Any],
        tasks: TaskService,
        node: Node,
        attempt: Attempt = None,
    ) -> dict[str, Any]:
        """What the node's job prints, as it prints it: one JSON object a line."""
        node_id, attempt_now = node.id, _attempt(attempt)
        lines = 0
        async for batch in _ndjson(request.stream()):
            await anyio.to_thread.run_sync(lambda b=batch: _write(tasks, task_id, node_id, attempt_now, b))  # type: ignore[misc]
            lines += len(batch)
        return {"lines": lines}

    @post("/{task_id:str}/renew", status_code=200, sync_to_thread=True)
    def renew(self, task_id: str, tasks: TaskService, node: Node, attempt: Attempt = None) -> dict[str, Any]:
        """Extend this node's lease; 409 lease_lost when it is not this node's any more."""
        task = tasks.node_renew(task_id, node.id, attempt=_attempt(attempt))
        return {"lease_expires_at": task.lease_expires_at}

    @post("/{task_id:str}/finish", status_code=200)
    async def finish(
        self,
        task_id: str,
        request: Request[Any, Any, Any],
        tasks: TaskService,
        node: Node,
        attempt: Attempt = None,
    ) -> dict[str, Any]:
        """End the task as the job did; the same finish again is `{"duplicate": true}`."""
        node_id, attempt_now = node.id, _attempt(attempt)
        finish = parse_body(NodeFinish, await request.body())
        task, duplicate = await anyio.to_thread.run_sync(
            lambda: tasks.node_finish(task_id, node_id, finish, attempt=attempt_now)
        )
        return {"state": task.state, "duplicate": duplicate}


def _write(
    tasks: TaskService, task_id: str, node_id: str, attempt: int, batch: list[tuple[StreamName, str]]
) -> None:
    for stream, text in batch:
        tasks.node_output(task_id, node_id, stream, text, attempt=attempt)


async def _ndjson(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[StreamName, str]]]:
    """The lines of a streamed body, parsed, a batch per chunk received (so each is written as it came)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *whole, pending = pending.split(b"\n")
        if len(pending) > MAX_OUTPUT_LINE_BYTES:
            raise InvalidInput(
                f"an output line passes {MAX_OUTPUT_LINE_BYTES} bytes", hint="send output in shorter lines"
            )
        batch = [_line(line) for line in whole if line.strip()]
        if batch:
            yield batch
    if pending.strip():
        yield [_line(pending)]


def _line(line: bytes) -> tuple[StreamName, str]:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise InvalidInput(
            "an output line is not JSON", hint='send {"stream": "stdout", "text": "..."} a line'
        ) from exc
    if (
        not isinstance(item, dict)
        or item.get("stream") not in STREAMS
        or not isinstance(item.get("text"), str)
    ):
        raise InvalidInput(
            'an output line is not {"stream": "stdout" or "stderr", "text": a string}',
            hint='send {"stream": "stdout", "text": "..."} a line',
        )
    return cast("StreamName", item["stream"]), item["text"]
