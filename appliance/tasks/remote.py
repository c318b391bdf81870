"""The server's side of the tasks worker nodes run: claim, attachments, output, renew, finish.

A node claims a script or commands task (its lease owner is ``node:<node id>``), fetches its
attachments, streams its output here (written to the task's files and passed to its followers as it
comes, up to its output limit), renews its lease and finishes it. Each is accepted only from the
node that holds the lease and for the attempt its claim handed out (``LeaseLost`` otherwise), so a
node thought dead cannot touch a task that moved on, and a node's late call from a job of an earlier
attempt cannot touch the task's next attempt on that node; the same finish twice is a duplicate, not
a second end. A node that stops renewing is recovered by the task service like a process that died
(``recover``). ``NodeTasks`` is a part of ``TaskService`` (its base), kept here for size; its
followers' feeds outlive an attempt, so a follower sees a retry too.

Imports: the store's records, audit, identity, errors, settings and this package's records.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from appliance.audit import Context, audited
from appliance.errors import Forbidden, LeaseLost, TaskFinished, TaskNotFound
from appliance.identity import Actor
from appliance.settings import Settings
from appliance.store.base import FINISHED_TASK_STATES, Store, Task, TaskMode, utcnow
from appliance.tasks.forwarder import MCP_PATH, task_actor
from appliance.tasks.output import StreamName, utf8_prefix
from appliance.tasks.records import (
    Live,
    TaskEvent,
    TaskOut,
    audit_start,
    granted_tools,
    has_inference,
    job_limits,
    now_plus,
)

__all__ = ["NODE_MODES", "NodeFinish", "NodeTask", "NodeTasks", "RemoteRun", "node_owner"]

NODE_MODES: tuple[TaskMode, ...] = ("script", "commands")  # prompts stay with the server's router


class NodeTask(BaseModel):
    """A task as a worker node gets it when it claims one: what its job needs."""

    id: str
    mode: TaskMode
    text: str
    limits: dict[str, Any]
    inference: bool
    tools: list[str] = []  # the MCP tools its job may call: MCP_URL, run and job ids in its env
    attachments: list[dict[str, Any]]  # {"name", "size_bytes"}, fetched from the attachments route
    lease_seconds: float  # renew well within this, or the task runs again elsewhere
    attempt: int  # the task's attempts with this claim: sent back with output, renew and finish


class NodeFinish(BaseModel):
    """How a node's job ended: the task's state and its result (the fields of a local job's)."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["succeeded", "failed", "canceled"]
    result: dict[str, Any]


@dataclass
class RemoteRun:
    """A task a worker node runs: the node holding its lease now (None while it waits for another),
    how much of each stream is written here, and its followers (kept across attempts)."""

    live: Live
    owner: str | None = None
    attempt: int = 0  # the task's attempt the owner runs
    limit: int = 0  # bytes kept per stream: the task's output limit
    written: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, bool] = field(default_factory=dict)


def node_owner(node_id: str) -> str:
    """The lease owner of a task a node runs."""
    return f"node:{node_id}"


class NodeTasks:
    """The node side of ``TaskService``; the attributes below are the service's."""

    settings: Settings
    store: Store
    server: str | None
    on_queued: Callable[[], None] | None  # set by the cluster: wake the nodes, from any thread
    _remote: dict[str, RemoteRun]
    _remote_lock: threading.Lock

    def task_dir(self, task_id: str) -> Path:
        raise NotImplementedError  # the service's

    @property
    def lease_seconds(self) -> float:
        return float(self.settings.tasks.lease_seconds)

    def claim_for_node(
        self, node_id: str, capabilities: dict[str, Any], *, drained: bool = False
    ) -> NodeTask | None:
        """The oldest queued script or commands task, leased to the node now; None when none
        waits, when such tasks run only on the server (``tasks.where`` = ``local``), when the
        node is drained, or when its capabilities say its sandbox cannot run jobs."""
        sandbox = capabilities.get("sandbox")
        if (
            drained
            or self.settings.tasks.where == "local"
            or not (isinstance(sandbox, dict) and sandbox.get("available"))
        ):
            return None
        owner = node_owner(node_id)
        task = self.store.claim_task(
            owner=owner, lease_expires_at=now_plus(self.lease_seconds), modes=NODE_MODES, server=self.server
        )
        if task is None:
            return None
        context = Context(Actor.from_label(task.actor), correlation_id=task.id)
        audit_start(self.store, context, task, node=node_id)
        task_dir = self.task_dir(task.id)
        for stream in ("stdout", "stderr"):  # a retry's output starts anew, as it does here
            (task_dir / stream).write_text("")
        with self._remote_lock:
            remote = self._remote.setdefault(task.id, RemoteRun(live=Live()))
            remote.owner, remote.attempt, remote.written, remote.truncated = owner, task.attempts, {}, {}
            remote.limit = self._output_limit(task)
        remote.live.publish(TaskEvent("state", TaskOut.of(task).model_dump(mode="json")))
        attachments = [
            {"name": path.name, "size_bytes": path.stat().st_size}
            for path in sorted((task_dir / "work").iterdir())
            if path.is_file() and not path.is_symlink()
        ]
        return NodeTask(
            id=task.id,
            mode=task.mode,
            text=task.text,
            limits=job_limits(task),
            inference=has_inference(task),
            tools=sorted(granted_tools(task)),
            attachments=attachments,
            lease_seconds=self.lease_seconds,
            attempt=task.attempts,
        )

    def node_attachment(self, task_id: str, node_id: str, name: str) -> Path:
        """The file of a task's work dir a node fetches; only for the node that holds its lease."""
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if task.state != "running" or task.lease_owner != node_owner(node_id):
            raise Forbidden(
                f"task {task_id} is not leased to node {node_id}",
                hint="fetch the attachments only of a task this node claimed and still holds",
            )
        path = self.task_dir(task_id) / "work" / name
        if "/" in name or name in ("", ".", "..") or not path.is_file() or path.is_symlink():
            raise TaskNotFound(f"task {task_id} has no attachment {name!r}")
        return path

    def node_acts_for(self, task_id: str, node_id: str, *, route: str, run_id: str | None = None) -> Actor:
        """Who a node's call for a task's job acts as (``task:<id>``, a user's rights): only while
        the node holds the task's lease and, when the call names its run, for the task's current
        attempt; else Forbidden. Audited here as ``task.inference`` (the worker that forwarded it
        keeps no audit log), but for an MCP call, which the gateway audits itself (as ``mcp.call``)."""
        task = self.store.get_task(task_id)
        refusal = None
        if task is None or task.state != "running" or task.lease_owner != node_owner(node_id):
            refusal = Forbidden(
                f"node {node_id} does not hold a lease on task {task_id}",
                hint="a worker calls the appliance for a task only while it runs that task",
            )
        elif run_id is not None and run_id != str(task.attempts):
            refusal = Forbidden(
                f"node {node_id} called for run {run_id} of task {task_id}, which is on run {task.attempts}",
                hint="a job's calls count only while its run is the task's current attempt",
            )
        if route.partition(" ")[2] == MCP_PATH:  # the gateway audits MCP calls, let through or refused
            if refusal is not None:
                raise refusal
            return task_actor(task_id)
        context = Context(task_actor(task_id), correlation_id=task_id)
        with audited(self.store, context, action="task.inference", target=task_id) as note:
            note.detail.update(route=route, node=node_id)
            if refusal is not None:
                raise refusal
        return task_actor(task_id)

    def node_renew(self, task_id: str, node_id: str, *, attempt: int) -> Task:
        """Extend the node's lease; LeaseLost once it is not the node's (recovered, cancelled,
        ended) or ``attempt`` is not the task's current one."""
        owner = node_owner(node_id)
        try:
            return self.store.update_task(
                task_id,
                only_from=("running",),
                only_owner=owner,
                only_attempt=attempt,
                lease_expires_at=now_plus(self.lease_seconds),
            )
        except TaskFinished as exc:
            raise LeaseLost(f"task {task_id} no longer runs: {exc}") from exc

    def node_output(self, task_id: str, node_id: str, stream: StreamName, text: str, *, attempt: int) -> None:
        """Append what the node's job printed to the task's files and pass it to its followers,
        up to the task's output limit; LeaseLost once the lease is not the node's or ``attempt``
        is not the task's current one."""
        remote = self._remote_for(task_id, node_owner(node_id), attempt)
        data = text.encode()
        with self._remote_lock:
            if remote.owner != node_owner(node_id) or remote.attempt != attempt:
                raise LeaseLost(f"task {task_id} is no longer leased to node {node_id} for attempt {attempt}")
            if remote.truncated.get(stream):
                return
            written = remote.written.get(stream, 0)
            room = remote.limit - written
            if len(data) > room:
                data = utf8_prefix(data, room)
                remote.truncated[stream] = True
            remote.written[stream] = written + len(data)
            if data:
                with (self.task_dir(task_id) / stream).open("ab") as file:
                    file.write(data)
        if data:
            remote.live.publish(
                TaskEvent("output", {"stream": stream, "text": data.decode(errors="replace")})
            )

    def node_finish(
        self, task_id: str, node_id: str, finish: NodeFinish, *, attempt: int
    ) -> tuple[Task, bool]:
        """End the task as the node's job did; returns it and whether this finish was a duplicate
        (the same node finished this attempt already: nothing changes). LeaseLost from any other
        node, and for an attempt that is not the task's current one."""
        owner = node_owner(node_id)
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if task.lease_owner != owner:
            raise LeaseLost(f"task {task_id} is not leased to node {node_id}")
        if task.attempts != attempt:
            raise LeaseLost(f"task {task_id} is on attempt {task.attempts}, not {attempt}")
        if task.state in FINISHED_TASK_STATES and (task.result or {}).get("node") == node_id:
            return task, True
        context = Context(Actor.from_label(task.actor), correlation_id=task.id)
        result = {**finish.result, "node": node_id}
        with self._remote_lock:
            remote = self._remote.get(task_id)
            if remote is not None and remote.owner == owner and remote.attempt == attempt:
                truncated = result.get("truncated")
                if isinstance(truncated, dict):  # cut here too, past what the node sent
                    result["truncated"] = {
                        stream: bool(truncated.get(stream)) or remote.truncated.get(stream, False)
                        for stream in ("stdout", "stderr")
                    }
        with audited(self.store, context, action="task.finish", target=task_id) as note:
            note.detail.update(node=node_id)
            try:
                ended = self.store.update_task(
                    task_id,
                    only_from=("running",),
                    only_owner=owner,
                    only_attempt=attempt,
                    state=finish.state,
                    result=result,
                    finished_at=utcnow(),
                    lease_expires_at=None,  # the owner stays: it tells a duplicate finish
                )
            except TaskFinished:  # cancelled meanwhile: keep that, with what the job did
                found = self.store.get_task(task_id) or task
                ended = self.store.update_task(
                    task_id,
                    only_owner=owner,
                    only_attempt=attempt,
                    result={**result, "reason": (found.result or {}).get("reason", "canceled")},
                    lease_expires_at=None,
                )
            note.outcome = "ok" if ended.state == "succeeded" else "error"
            note.detail.update(state=ended.state, reason=(ended.result or {}).get("reason"))
        self._end_remote(ended)
        return ended, False

    def _remote_for(self, task_id: str, owner: str, attempt: int) -> RemoteRun:
        """The node's run of the task, checked against the store when this process does not know
        it (it restarted since the claim); LeaseLost when the lease is not ``owner``'s or the
        task is not on ``attempt``."""
        with self._remote_lock:
            remote = self._remote.get(task_id)
            if remote is not None and remote.owner == owner and remote.attempt == attempt:
                return remote
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if task.state != "running" or task.lease_owner != owner or task.attempts != attempt:
            raise LeaseLost(
                f"task {task_id} is {task.state} on attempt {task.attempts}, not leased to {owner}"
                f" for attempt {attempt}"
            )
        task_dir = self.task_dir(task_id)
        with self._remote_lock:
            remote = self._remote.setdefault(task_id, RemoteRun(live=Live()))
            if remote.owner != owner or remote.attempt != attempt:
                remote.owner, remote.attempt, remote.truncated = owner, attempt, {}
                remote.written = {
                    stream: (task_dir / stream).stat().st_size if (task_dir / stream).exists() else 0
                    for stream in ("stdout", "stderr")
                }
            remote.limit = self._output_limit(task)
            return remote

    def _output_limit(self, task: Task) -> int:
        return int(job_limits(task).get("output_bytes", self.settings.tasks.limits.output_bytes))

    def _remote_live(self, task_id: str) -> Live | None:
        """The followers' feed of a task a node runs now."""
        with self._remote_lock:
            remote = self._remote.get(task_id)
        return remote.live if remote is not None else None

    def _offer(self, task: Task) -> None:
        """Tell the nodes a task they may take waits."""
        if task.state == "queued" and task.mode in NODE_MODES and self.settings.tasks.where != "local":
            hook = self.on_queued
            if hook is not None:
                hook()

    def _release_remote(self, task: Task) -> None:
        """A node's task waits again: no node holds it; its followers see it queued."""
        with self._remote_lock:
            remote = self._remote.get(task.id)
            if remote is not None:
                remote.owner = None
        if remote is not None:
            remote.live.publish(TaskEvent("state", TaskOut.of(task).model_dump(mode="json")))

    def _end_remote(self, task: Task) -> None:
        """A node's task ended: its followers get the end, and later output from a node is refused."""
        with self._remote_lock:
            remote = self._remote.pop(task.id, None)
        if remote is not None:
            remote.live.publish(TaskEvent("end", TaskOut.of(task).model_dump(mode="json")))
