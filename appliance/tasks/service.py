"""Tasks: work a user hands the appliance, kept in the store and run by a queue in the server.

A task is a ``prompt`` for a model (answered through the same inference service as ``/v1``; its
text is never run as a command), or a ``script`` or ``commands`` run in the sandbox. Its output
lives in files under the data dir, written as it comes, so a restart keeps what a task printed:

    <data>/tasks/<id>/work/      the job's /work: its attachments, and what it writes there
    <data>/tasks/<id>/stdout     what it printed (a prompt's answer), up to its output limit
    <data>/tasks/<id>/stderr

The queue runs on a thread of its own with its own event loop (``start``/``close``): up to
``tasks.max_running`` tasks at once, oldest first. A running task holds a lease (``tasks.lease_seconds``)
that the queue renews; a task whose process died (its lease expired, or the process is gone from
this host) is queued again once (``attempts`` < 2) or failed with the reason ``STOPPED_REASON``.
Cancelling marks the row first, so any process may cancel; the process running it sees that and
stops the job.

Worker nodes run script and commands tasks too (``tasks.where``: ``any``, ``local`` or
``workers``), through the ``node_*`` methods the cluster's task routes call: a node claims a task
(its lease owner is ``node:<node id>``), fetches its attachments, streams its output here (written
to the same files and passed to followers as it comes), renews its lease and finishes it. Each of
those is accepted only from the node that holds the lease (``LeaseLost`` otherwise), so a node
thought dead cannot touch a task that moved on; the same finish twice is a duplicate, not a
second end. A node that stops renewing is recovered like a process that died here.

Followers (``follow``) get the task's state changes and output as they come: from memory while it
runs here, from the store and the files otherwise.

Imports: the sandbox package, the store's records, the registry, the engine's service (types),
audit, identity, the bridge, errors and settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context, audited
from appliance.bridge import LoopInbox
from appliance.engine.base import Finished, TextChunk
from appliance.errors import (
    ApplianceError,
    BodyTooLarge,
    Forbidden,
    InvalidInput,
    LeaseLost,
    TaskFinished,
    TaskNotFound,
)
from appliance.identity import Actor
from appliance.models.service import ModelService
from appliance.settings import Settings
from appliance.store.base import FINISHED_TASK_STATES, Store, Task, TaskMode, TaskState, utcnow
from appliance.tasks.forwarder import InferenceForwarder, local_forwarder, task_actor
from appliance.tasks.jobs import Job, JobResult, Limits, Outcome
from appliance.tasks.output import OutputCapture, OutputChunk, StreamName, utf8_prefix
from appliance.tasks.sandbox import Sandbox

if TYPE_CHECKING:
    from appliance.engine.service import InferenceService

__all__ = [
    "NODE_MODES",
    "STOPPED_REASON",
    "Attachment",
    "NewTask",
    "NodeFinish",
    "NodeTask",
    "TaskEvent",
    "TaskOut",
    "TaskService",
    "TaskState",
    "node_owner",
]

log = logging.getLogger(__name__)

STOPPED_REASON = "the server stopped while it ran"
MAX_ATTEMPTS = 2  # a task that was running when its server (or worker) stopped is run once more, then failed
RENEW_SECONDS = 5.0  # at most; also how soon a cancel made by another process reaches the job
NODE_MODES: tuple[TaskMode, ...] = ("script", "commands")  # prompts stay with the server's router
POLL_SECONDS = 1.0  # how often the queue looks for work other processes queued
FOLLOW_POLL_SECONDS = 0.05  # a follower of a task not running here rereads the store this often
MAX_NAME_BYTES = 255
PROMPT_ENDPOINT = "/api/v1/tasks"
INFERENCE_OPTION = "inference"  # in a task's stored limits: whether its job may call models


@dataclass(frozen=True)
class Attachment:
    """A file for the task's work dir: a plain name (no directories) and its content."""

    name: str
    data: bytes


class NewTask(BaseModel):
    """What a caller asks for; the limits it leaves out are the ``tasks.limits`` settings."""

    model_config = ConfigDict(extra="forbid")

    mode: TaskMode = Field(default="prompt", description="prompt (to a model), script or commands.")
    text: str = Field(description="The prompt, the script, or the commands (one per line).")
    model: str | None = Field(default=None, description="The model a prompt goes to.")
    limits: dict[str, float] = Field(
        default_factory=dict, description="Lower limits than tasks.limits: cpu_seconds, timeout_seconds..."
    )
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, description="The same key gives back the same task."
    )
    inference: bool = Field(
        default=False,
        description="Let a script or commands call models: INFERENCE_URL and OLLAMA_BASE_URL inside the job.",
    )


class TaskOut(BaseModel):
    """A task as the API and the CLI show it."""

    id: str
    mode: str
    text: str
    model: str | None
    state: str
    actor: str
    attempts: int
    limits: dict[str, Any]
    inference: bool
    result: dict[str, Any] | None
    idempotency_key: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        fields = {name: getattr(task, name) for name in cls.model_fields if name != "inference"}
        fields["limits"] = _job_limits(task)
        return cls(**fields, inference=_has_inference(task))


@dataclass(frozen=True)
class NodeTask(BaseModel):
    """A task as a worker node gets it when it claims one: what its job needs."""

    id: str
    mode: TaskMode
    text: str
    limits: dict[str, Any]
    inference: bool
    attachments: list[dict[str, Any]]  # {"name", "size_bytes"}, fetched from the attachments route
    lease_seconds: float  # renew well within this, or the task runs again elsewhere


class NodeFinish(BaseModel):
    """How a node's job ended: the task's state and its result (the fields of a local job's)."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["succeeded", "failed", "canceled"]
    result: dict[str, Any]


@dataclass(frozen=True)
class TaskEvent:
    """What a follower gets: ``state`` (the task, as TaskOut's JSON), ``output`` (``stream`` and
    ``text``), then one ``end`` (the task as it ended)."""

    kind: Literal["state", "output", "end"]
    data: dict[str, Any]


class _Live:
    """A task running in this process: its events so far, handed to followers on any event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[TaskEvent] = []
        self._inboxes: set[LoopInbox[TaskEvent]] = set()

    def publish(self, event: TaskEvent) -> None:
        with self._lock:
            self._events.append(event)
            inboxes = list(self._inboxes)
        for inbox in inboxes:
            inbox.put(event)

    async def follow(self) -> AsyncIterator[TaskEvent]:
        inbox: LoopInbox[TaskEvent] = LoopInbox()
        with self._lock:
            seen = list(self._events)
            self._inboxes.add(inbox)
        try:
            for event in seen:
                yield event
                if event.kind == "end":
                    return
            while True:
                event = await inbox.get()
                yield event
                if event.kind == "end":
                    return
        finally:
            with self._lock:
                self._inboxes.discard(inbox)


@dataclass
class _Running:
    """A task this process runs: how to stop it, and why it was stopped."""

    live: _Live
    stop: Callable[[], None] | None = None
    stopped_for: Literal["cancel", "shutdown"] | None = None
    files: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Remote:
    """A task a worker node runs: the node holding its lease now (None while it waits for another),
    how much of each stream is written here, and its followers (kept across attempts)."""

    live: _Live
    owner: str | None = None
    limit: int = 0  # bytes kept per stream: the task's output limit
    written: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, bool] = field(default_factory=dict)


def node_owner(node_id: str) -> str:
    """The lease owner of a task a node runs."""
    return f"node:{node_id}"


def _now_plus(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _process_gone(owner: str | None) -> bool:
    """Whether the process a lease names is gone: it ran on this host and no longer lives, or it
    was this very process (a restart that got the same pid) before this queue started."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or (owner or "").startswith("node:"):
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it lives, as another user
        return False
    return False


class TaskService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelService,
        *,
        inference: InferenceService | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.inference = inference
        self.sandbox = sandbox if sandbox is not None else Sandbox(hidden=_hidden_paths(settings))
        self.forwarder: InferenceForwarder = local_forwarder(settings, store)
        self.root = settings.data_dir / "tasks"
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._running: dict[str, _Running] = {}
        self._running_lock = threading.Lock()
        self._remote: dict[str, _Remote] = {}
        self._remote_lock = threading.Lock()
        # Called (from any thread) when a task a node may take is queued: the cluster wakes its nodes.
        self.on_queued: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def lease_seconds(self) -> float:
        return float(self.settings.tasks.lease_seconds)

    @property
    def renew_seconds(self) -> float:
        """How often leases are renewed (and expired ones recovered): well within a lease."""
        return min(RENEW_SECONDS, self.lease_seconds / 3)

    # -- files -------------------------------------------------------------------------------

    def task_dir(self, task_id: str) -> Path:
        return self.root / task_id

    def _make_task_dir(self, task_id: str) -> Path:
        # As root, jobs run as nobody, who must pass through these on the way to the work dir.
        self.root.mkdir(mode=0o711, exist_ok=True)
        self.root.chmod(0o711)
        task_dir = self.task_dir(task_id)
        (task_dir / "work").mkdir(mode=0o711, parents=True)
        task_dir.chmod(0o711)
        return task_dir

    def output(self, task_id: str, stream: Literal["stdout", "stderr"]) -> str:
        """What the task printed on ``stream`` so far (empty before it started)."""
        try:
            return (self.task_dir(task_id) / stream).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- creating, reading, cancelling ----------------------------------------------------------

    def create(
        self, request: NewTask, attachments: Sequence[Attachment], context: Context
    ) -> tuple[Task, bool]:
        """Queue a task (its attachments in its work dir); returns it and whether it is new. The
        same idempotency key from the same actor gives back the first task, and writes nothing."""
        limits = self._limits(request.limits)
        self._check(request, attachments)
        # Kept with the limits: like them, it bounds what the job may reach.
        limits[INFERENCE_OPTION] = request.inference
        task_id = uuid.uuid4().hex
        with audited(self.store, context, action="task.create", target=task_id) as note:
            task_dir = self._make_task_dir(task_id)
            try:
                for attachment in attachments:
                    (task_dir / "work" / attachment.name).write_bytes(attachment.data)
                task, added = self.store.create_task(
                    Task(
                        id=task_id,
                        mode=request.mode,
                        text=request.text,
                        model=request.model,
                        state="queued",
                        actor=context.actor,
                        limits=limits,
                        idempotency_key=request.idempotency_key,
                    )
                )
            except BaseException:
                shutil.rmtree(task_dir, ignore_errors=True)
                raise
            if not added:  # the actor sent this key before: that task stands, nothing is written
                shutil.rmtree(task_dir, ignore_errors=True)
                note.target = task.id
                note.detail.update(idempotent_replay=True)
                return task, False
            note.bytes = sum(len(attachment.data) for attachment in attachments)
            note.detail.update(mode=request.mode, model=request.model, attachments=len(attachments))
        self._poke()
        self._offer(task)
        return task, added

    def _limits(self, asked: dict[str, float]) -> dict[str, Any]:
        caps = self.settings.tasks.limits
        limits: dict[str, Any] = caps.model_dump()
        for name, value in asked.items():
            if name not in limits:
                raise InvalidInput(
                    f"{name!r} is not a task limit",
                    hint=f"use one of {', '.join(sorted(limits))}",
                )
            cap = limits[name]
            if isinstance(value, bool) or not value > 0:
                raise InvalidInput(f"the task limit {name} must be above zero, not {value!r}")
            if value > cap:
                raise InvalidInput(
                    f"the task limit {name} of {value:g} is above this appliance's {cap:g}",
                    hint=f"ask for at most {cap:g}, or raise the tasks.limits.{name} setting",
                )
            if isinstance(cap, int) and value != int(value):
                raise InvalidInput(f"the task limit {name} must be a whole number, not {value!r}")
            limits[name] = type(cap)(value)
        return limits

    def _check(self, request: NewTask, attachments: Sequence[Attachment]) -> None:
        if not request.text.strip():
            raise InvalidInput(f"the task's {request.mode} is empty", hint=f"give the {request.mode} to run")
        if "\0" in request.text:
            raise InvalidInput(
                f"the task's {request.mode} holds a NUL byte", hint="send text without NUL bytes"
            )
        if request.mode == "prompt":
            if request.inference:
                raise InvalidInput(
                    "inference is for script and commands tasks: a prompt task goes to its model already",
                    hint="leave inference out of a prompt task",
                )
            if request.model is None:
                raise InvalidInput("a prompt task needs a model", hint="name one with model (--model)")
            self.models.get(request.model)  # ModelNotFound, InvalidModelName
            if attachments:
                raise InvalidInput(
                    "a prompt task takes no attachments",
                    hint="put the text in the prompt, or attach files to a script or commands task",
                )
        total = sum(len(attachment.data) for attachment in attachments)
        limit = self.settings.tasks.max_attachment_bytes
        if total > limit:
            raise BodyTooLarge(limit, what="the task's attachments", setting="tasks.max_attachment_bytes")
        names = set()
        for attachment in attachments:
            name = attachment.name
            if (
                not name
                or name in (".", "..")
                or "/" in name
                or "\0" in name
                or len(name.encode()) > MAX_NAME_BYTES
            ):
                raise InvalidInput(
                    f"{name!r} is not an attachment name",
                    hint="name each attachment as a plain file name (no directories), as it should "
                    "appear in the job's /work",
                )
            if name in names:
                raise InvalidInput(f"two attachments are named {name!r}", hint="give each its own name")
            names.add(name)

    def get(self, task_id: str, who: Actor) -> Task:
        """The task, when ``who`` may see it: their own, or any for an admin (or without auth)."""
        task = self.store.get_task(task_id)
        if task is None or not _may_see(who, task):
            raise TaskNotFound(f"task {task_id} not found")
        return task

    def list_tasks(self, who: Actor, *, states: Sequence[TaskState] = (), limit: int = 100) -> list[Task]:
        """Newest first: ``who``'s own, or everyone's for an admin (or without auth)."""
        actor = who.label if who.role in ("user", "node") else None
        return self.store.list_tasks(states=states, actor=actor, limit=limit)

    def cancel(self, task_id: str, context: Context) -> Task:
        """Stop a queued or running task; raises TaskFinished once it has ended."""
        self.get(task_id, context.who)
        with audited(self.store, context, action="task.cancel", target=task_id):
            task = self.store.update_task(
                task_id,
                only_from=("queued", "running"),
                state="canceled",
                finished_at=utcnow(),
                result={"reason": f"canceled by {context.actor}"},
            )
        self._stop_here(task_id, "cancel")
        # A node learns it at its next renew; its followers learn it now.
        self._end_remote(task)
        return task

    # -- following --------------------------------------------------------------------------

    async def follow(self, task_id: str, who: Actor) -> AsyncIterator[TaskEvent]:
        """The task's state, its output as it comes, then ``end``: from memory while it runs in
        this process, else from the store and its files."""
        task = await asyncio.to_thread(self.get, task_id, who)
        yield TaskEvent("state", TaskOut.of(task).model_dump(mode="json"))
        while True:
            live = self._live(task_id)
            if live is not None:
                async for event in live.follow():
                    yield event
                return
            if task.state in FINISHED_TASK_STATES:
                for stream in ("stdout", "stderr"):
                    text = await asyncio.to_thread(self.output, task_id, stream)
                    if text:
                        yield TaskEvent("output", {"stream": stream, "text": text})
                yield TaskEvent("end", TaskOut.of(task).model_dump(mode="json"))
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            before, task = task.state, await asyncio.to_thread(self.get, task_id, who)
            if task.state != before and self._live(task_id) is None:
                yield TaskEvent("state", TaskOut.of(task).model_dump(mode="json"))

    # -- the queue --------------------------------------------------------------------------

    def start(self) -> None:
        """Run the queue on a thread of its own until ``close``."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="tasks", daemon=True)
        self._thread.start()
        self._started.wait()

    def close(self) -> None:
        """Stop the queue: tasks still running are stopped and queued again (or failed) as after a crash."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        with suppress(RuntimeError):  # its loop has already ended
            loop.call_soon_threadsafe(stopping.set)
        thread.join()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def _stop_here(self, task_id: str, why: Literal["cancel", "shutdown"]) -> None:
        running, loop = self._running.get(task_id), self._loop
        if running is None or loop is None:
            return

        def stop() -> None:
            if running.stopped_for is None:
                running.stopped_for = why
            if running.stop is not None:
                running.stop()

        with suppress(RuntimeError):
            loop.call_soon_threadsafe(stop)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake, self._stopping = asyncio.Event(), asyncio.Event()
        self._started.set()
        workers: set[asyncio.Task[None]] = set()
        try:
            await asyncio.to_thread(self.recover, at_start=True)
            renewed = time.monotonic()
            while not self._stopping.is_set():
                while len(workers) < self.settings.tasks.max_running:
                    task = await asyncio.to_thread(
                        self.store.claim_task,
                        owner=self.owner,
                        lease_expires_at=_now_plus(self.lease_seconds),
                        modes=("prompt",) if self.settings.tasks.where == "workers" else (),
                    )
                    if task is None:
                        break
                    # A retry of a task a node ran keeps that task's followers.
                    with self._remote_lock:
                        remote = self._remote.pop(task.id, None)
                    self._running[task.id] = _Running(live=remote.live if remote else _Live())
                    worker = asyncio.create_task(self._execute(task))
                    workers.add(worker)
                    worker.add_done_callback(workers.discard)
                    worker.add_done_callback(lambda _: self._wake.set() if self._wake else None)
                self._wake.clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await _first_of(self._wake, self._stopping)
                if time.monotonic() - renewed >= self.renew_seconds:
                    renewed = time.monotonic()
                    await asyncio.to_thread(self._renew)
                    await asyncio.to_thread(self.recover, at_start=False)
        finally:
            for task_id in list(self._running):
                self._stop_here(task_id, "shutdown")
            if workers:
                await asyncio.gather(*workers, return_exceptions=True)

    def recover(self, *, at_start: bool) -> list[Task]:
        """Queue again (or fail) the tasks whose process stopped while they ran: their lease
        expired, or (at start) the process named by it is gone from this host."""
        now = utcnow()
        recovered = []
        for task in self.store.list_tasks(states=("running",), limit=1_000_000):
            if task.id in self._running:
                continue
            expired = task.lease_expires_at is None or task.lease_expires_at < now
            if not expired and not (at_start and _process_gone(task.lease_owner)):
                continue
            with suppress(TaskFinished):
                recovered.append(self._requeue_or_fail(task))
        return recovered

    def _requeue_or_fail(self, task: Task) -> Task:
        context = Context(Actor(id="tasks", kind="task"))
        if task.attempts < MAX_ATTEMPTS:
            with audited(self.store, context, action="task.retry", target=task.id) as note:
                note.detail.update(reason=STOPPED_REASON, attempts=task.attempts, owner=task.lease_owner)
                queued = self.store.update_task(
                    task.id, only_from=("running",), state="queued", lease_owner=None, lease_expires_at=None
                )
            self._release_remote(queued)
            self._offer(queued)
            return queued
        with audited(self.store, context, action="task.finish", target=task.id) as note:
            note.outcome = "error"
            note.detail.update(state="failed", reason=STOPPED_REASON, owner=task.lease_owner)
            failed = self.store.update_task(
                task.id,
                only_from=("running",),
                state="failed",
                finished_at=utcnow(),
                lease_owner=None,
                lease_expires_at=None,
                result={**(task.result or {}), "reason": STOPPED_REASON},
            )
        self._end_remote(failed)
        return failed

    def _renew(self) -> None:
        """Extend the leases of the tasks running here; one cancelled meanwhile (by any process) stops."""
        for task_id in list(self._running):
            try:
                self.store.update_task(
                    task_id, only_from=("running",), lease_expires_at=_now_plus(self.lease_seconds)
                )
            except TaskFinished:
                self._stop_here(task_id, "cancel")
            except ApplianceError as exc:  # the store failed: the next round tries again
                log.warning("could not renew the lease of task %s: %s", task_id, exc)

    # -- tasks worker nodes run ------------------------------------------------------------

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
            owner=owner, lease_expires_at=_now_plus(self.lease_seconds), modes=NODE_MODES
        )
        if task is None:
            return None
        context = Context(Actor.from_label(task.actor), correlation_id=task.id)
        _audit_start(self.store, context, task, node=node_id)
        task_dir = self.task_dir(task.id)
        for stream in ("stdout", "stderr"):  # a retry's output starts anew, as it does here
            (task_dir / stream).write_text("")
        with self._remote_lock:
            remote = self._remote.setdefault(task.id, _Remote(live=_Live()))
            remote.owner, remote.written, remote.truncated = owner, {}, {}
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
            limits=_job_limits(task),
            inference=_has_inference(task),
            attachments=attachments,
            lease_seconds=self.lease_seconds,
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

    def node_acts_for(self, task_id: str, node_id: str, *, route: str) -> Actor:
        """Who a node's call for a task's job acts as (``task:<id>``, a user's rights): only while
        the node holds the task's lease, else Forbidden. Audited here as ``task.inference``: the
        worker that forwarded it keeps no audit log."""
        context = Context(task_actor(task_id), correlation_id=task_id)
        with audited(self.store, context, action="task.inference", target=task_id) as note:
            note.detail.update(route=route, node=node_id)
            task = self.store.get_task(task_id)
            if task is None or task.state != "running" or task.lease_owner != node_owner(node_id):
                raise Forbidden(
                    f"node {node_id} does not hold a lease on task {task_id}",
                    hint="a worker calls models for a task only while it runs that task",
                )
        return task_actor(task_id)

    def node_renew(self, task_id: str, node_id: str) -> Task:
        """Extend the node's lease; LeaseLost once it is not the node's (recovered, cancelled, ended)."""
        owner = node_owner(node_id)
        try:
            return self.store.update_task(
                task_id,
                only_from=("running",),
                only_owner=owner,
                lease_expires_at=_now_plus(self.lease_seconds),
            )
        except TaskFinished as exc:
            raise LeaseLost(f"task {task_id} no longer runs: {exc}") from exc

    def node_output(self, task_id: str, node_id: str, stream: StreamName, text: str) -> None:
        """Append what the node's job printed to the task's files and pass it to its followers,
        up to the task's output limit; LeaseLost once the lease is not the node's."""
        remote = self._remote_for(task_id, node_owner(node_id))
        data = text.encode()
        with self._remote_lock:
            if remote.owner != node_owner(node_id):
                raise LeaseLost(f"task {task_id} is no longer leased to node {node_id}")
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

    def node_finish(self, task_id: str, node_id: str, finish: NodeFinish) -> tuple[Task, bool]:
        """End the task as the node's job did; returns it and whether this finish was a duplicate
        (the same node finished it already: nothing changes). LeaseLost from any other node."""
        owner = node_owner(node_id)
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if task.lease_owner != owner:
            raise LeaseLost(f"task {task_id} is not leased to node {node_id}")
        if task.state in FINISHED_TASK_STATES and (task.result or {}).get("node") == node_id:
            return task, True
        context = Context(Actor.from_label(task.actor), correlation_id=task.id)
        result = {**finish.result, "node": node_id}
        with self._remote_lock:
            remote = self._remote.get(task_id)
            if remote is not None and remote.owner == owner:
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
                    state=finish.state,
                    result=result,
                    finished_at=utcnow(),
                    lease_expires_at=None,  # the owner stays: it tells a duplicate finish
                )
            except TaskFinished:  # cancelled meanwhile: keep that, with what the job did
                found = self._reread(task)
                ended = self.store.update_task(
                    task_id,
                    only_owner=owner,
                    result={**result, "reason": (found.result or {}).get("reason", "canceled")},
                    lease_expires_at=None,
                )
            note.outcome = "ok" if ended.state == "succeeded" else "error"
            note.detail.update(state=ended.state, reason=(ended.result or {}).get("reason"))
        self._end_remote(ended)
        return ended, False

    def _remote_for(self, task_id: str, owner: str) -> _Remote:
        """The node's run of the task, checked against the store when this process does not know
        it (it restarted since the claim); LeaseLost when the lease is not ``owner``'s."""
        with self._remote_lock:
            remote = self._remote.get(task_id)
            if remote is not None and remote.owner == owner:
                return remote
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if task.state != "running" or task.lease_owner != owner:
            raise LeaseLost(f"task {task_id} is {task.state} and not leased to {owner}")
        task_dir = self.task_dir(task_id)
        with self._remote_lock:
            remote = self._remote.setdefault(task_id, _Remote(live=_Live()))
            if remote.owner != owner:
                remote.owner, remote.truncated = owner, {}
                remote.written = {
                    stream: (task_dir / stream).stat().st_size if (task_dir / stream).exists() else 0
                    for stream in ("stdout", "stderr")
                }
            remote.limit = self._output_limit(task)
            return remote

    def _output_limit(self, task: Task) -> int:
        return int(_job_limits(task).get("output_bytes", self.settings.tasks.limits.output_bytes))

    def _live(self, task_id: str) -> _Live | None:
        """The followers' feed of a task running now, here or on a node."""
        running = self._running.get(task_id)
        if running is not None:
            return running.live
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

    # -- running one task -------------------------------------------------------------------

    async def _execute(self, task: Task) -> None:
        running = self._running[task.id]
        context = Context(Actor.from_label(task.actor), correlation_id=task.id)
        running.live.publish(TaskEvent("state", TaskOut.of(task).model_dump(mode="json")))
        await asyncio.to_thread(_audit_start, self.store, context, task)
        task_dir = self.task_dir(task.id)
        result: dict[str, Any]
        state: TaskState
        try:
            with (task_dir / "stdout").open("w") as stdout, (task_dir / "stderr").open("w") as stderr:
                running.files = {"stdout": stdout, "stderr": stderr}
                try:
                    if task.mode == "prompt":
                        state, result = await self._answer(task, running)
                    else:
                        state, result = await self._run_job(task, running)
                except ApplianceError as exc:
                    state, result = "failed", {"reason": str(exc), "error": exc.code, "hint": exc.hint}
                except Exception as exc:
                    log.exception("task %s failed", task.id)
                    state, result = "failed", {"reason": f"internal error: {exc}", "error": "internal_error"}
            if running.stopped_for == "shutdown":
                ended = await asyncio.to_thread(
                    self._requeue_or_fail, await asyncio.to_thread(self._reread, task)
                )
            else:
                ended = await asyncio.to_thread(self._finish, task, state, result, context)
            running.live.publish(TaskEvent("end", TaskOut.of(ended).model_dump(mode="json")))
        finally:
            self._running.pop(task.id, None)

    def _reread(self, task: Task) -> Task:
        return self.store.get_task(task.id) or task

    def _finish(self, task: Task, state: TaskState, result: dict[str, Any], context: Context) -> Task:
        with audited(self.store, context, action="task.finish", target=task.id) as note:
            try:
                ended = self.store.update_task(
                    task.id,
                    only_from=("running",),
                    state=state,
                    result=result,
                    finished_at=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            except TaskFinished:  # cancelled meanwhile: keep that, with what the job did
                found = self._reread(task)
                ended = self.store.update_task(
                    task.id,
                    result={**result, "reason": (found.result or {}).get("reason", "canceled")},
                    lease_owner=None,
                    lease_expires_at=None,
                )
            note.outcome = "ok" if ended.state == "succeeded" else "error"
            note.detail.update(state=ended.state, reason=(ended.result or {}).get("reason"))
        return ended

    def _write(self, running: _Running, chunk: OutputChunk) -> None:
        stream = running.files[chunk.stream]
        stream.write(chunk.text)
        stream.flush()
        running.live.publish(TaskEvent("output", {"stream": chunk.stream, "text": chunk.text}))

    async def _run_job(self, task: Task, running: _Running) -> tuple[TaskState, dict[str, Any]]:
        assert task.mode != "prompt"
        async with AsyncExitStack() as stack:
            socket = (
                await stack.enter_async_context(self.forwarder.serving(task.id))
                if _has_inference(task)
                else None
            )
            job = Job(
                mode=task.mode,
                text=task.text,
                work_dir=self.task_dir(task.id) / "work",
                limits=Limits(**_job_limits(task)),
                env={"TASK_ID": task.id},
                inference_socket=socket,
            )
            call = self.sandbox.stream(job)
            running.stop = call.cancel
            if running.stopped_for is not None:
                call.cancel()
            async for chunk in call:
                self._write(running, chunk)
            done: JobResult = await call.result()
        return done.task_state, done.task_result()

    async def _answer(self, task: Task, running: _Running) -> tuple[TaskState, dict[str, Any]]:
        """A prompt's answer from its model, through the inference service (never a shell)."""
        if self.inference is None:
            raise InvalidInput("this process serves no models", hint="run tasks in `appliance serve`")
        inference = self.inference
        limits = Limits(**_job_limits(task))
        capture = OutputCapture(
            "stdout", limit=limits.output_bytes, on_output=lambda c: self._write(running, c)
        )
        started = time.monotonic()
        tokens: dict[str, int] = {}

        async def generate() -> None:
            from appliance.engine.service import GenerationOptions

            messages = [{"role": "user", "content": task.text}]
            stream = inference.chat(
                task.model or "",
                messages,
                GenerationOptions(),
                endpoint=PROMPT_ENDPOINT,
                correlation_id=task.id,
            )
            try:
                async for event in stream:
                    if isinstance(event, TextChunk):
                        capture.feed(event.text.encode())
                        if capture.truncated:
                            break
                    elif isinstance(event, Finished):
                        tokens.update(
                            prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens
                        )
            finally:
                await stream.aclose()
            capture.close()

        generation = asyncio.create_task(generate())
        running.stop = lambda: _cancel(generation)
        if running.stopped_for is not None:
            generation.cancel()
        outcome: Outcome = Outcome.EXITED
        state: TaskState = "succeeded"
        try:
            async with asyncio.timeout(limits.timeout_seconds):
                await asyncio.shield(generation)
        except TimeoutError:
            generation.cancel()
            with suppress(asyncio.CancelledError):
                await generation
            outcome, state = Outcome.TIMED_OUT, "failed"
        except asyncio.CancelledError:
            if running.stopped_for is None:
                raise
            outcome, state = Outcome.CANCELLED, "canceled"
        reason = {
            Outcome.EXITED: "answered",
            Outcome.TIMED_OUT: f"stopped after its time limit of {limits.timeout_seconds:g} s",
            Outcome.CANCELLED: "canceled",
        }[outcome]
        return state, {
            "outcome": "answered" if outcome is Outcome.EXITED else outcome.value,
            "duration_seconds": round(time.monotonic() - started, 3),
            "truncated": {"stdout": capture.truncated, "stderr": False},
            "reason": reason,
            **tokens,
        }


def _audit_start(store: Store, context: Context, task: Task, *, node: str | None = None) -> None:
    with audited(store, context, action="task.start", target=task.id) as note:
        note.detail.update(mode=task.mode, attempt=task.attempts)
        if node is not None:
            note.detail.update(node=node)


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _has_inference(task: Task) -> bool:
    return bool(task.limits.get(INFERENCE_OPTION, False))


def _job_limits(task: Task) -> dict[str, Any]:
    """The task's ``Limits`` fields: its limits without the inference option kept beside them."""
    return {name: value for name, value in task.limits.items() if name != INFERENCE_OPTION}


def _may_see(who: Actor, task: Task) -> bool:
    return who.role not in ("user", "node") or task.actor == who.label


def _hidden_paths(settings: Settings) -> list[Path]:
    """The config file, which a job would otherwise see when it sits in /etc (the data dir it never sees)."""
    config_file = type(settings).model_config.get("toml_file")
    return [Path(config_file)] if isinstance(config_file, str | Path) else []
