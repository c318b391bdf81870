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
``workers``), under leases owned by ``node:<node id>``: the ``node_*`` methods, in ``remote.py``.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context, audited
from appliance.auth.policy import Deny, Resource, decide
from appliance.engine.base import Finished, TextChunk
from appliance.errors import (
    ApplianceError,
    BodyTooLarge,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    TaskElsewhere,
    TaskFinished,
    TaskNotFound,
)
from appliance.identity import Actor
from appliance.mcp.types import TOOL_ACTIONS, TOOL_NAMES
from appliance.models.service import ModelService
from appliance.preferences import ALLOWED_ROLES, PreferenceService
from appliance.settings import Settings
from appliance.store.base import FINISHED_TASK_STATES, Store, Task, TaskMode, TaskState, utcnow
from appliance.tasks.forwarder import InferenceForwarder, JobAccess, local_forwarder, task_actor
from appliance.tasks.jobs import Job, JobResult, Limits, Outcome
from appliance.tasks.output import OutputCapture, OutputChunk
from appliance.tasks.records import (
    INFERENCE_OPTION,
    TOOLS_OPTION,
    Live,
    TaskEvent,
    TaskOut,
    audit_start,
    granted_tools,
    has_inference,
    job_limits,
    now_plus,
)
from appliance.tasks.remote import NODE_MODES, NodeFinish, NodeTask, NodeTasks, RemoteRun, node_owner
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
POLL_SECONDS = 1.0  # how often the queue looks for work that moved no change counter here
# A follower of a task not running here rereads it when the tasks' change counter moved (looked at
# this often: it is in memory), and at least every FOLLOW_REREAD_SECONDS (another process's write to
# a SQLite file moves no counter here).
FOLLOW_POLL_SECONDS = 0.05
FOLLOW_REREAD_SECONDS = 0.5
MAX_NAME_BYTES = 255
PROMPT_ENDPOINT = "/api/v1/tasks"


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
    tools: list[str] = Field(
        default_factory=list,
        description="The MCP tools a script or commands may call (MCP_URL inside the job); none by default.",
    )


@dataclass
class _Running:
    """A task this process runs: how to stop it, and why it was stopped."""

    live: Live
    stop: Callable[[], None] | None = None
    stopped_for: Literal["cancel", "shutdown"] | None = None
    files: dict[str, Any] = field(default_factory=dict)


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


class TaskService(NodeTasks):
    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelService,
        *,
        inference: InferenceService | None = None,
        sandbox: Sandbox | None = None,
        server: str | None = None,
    ) -> None:
        self.settings = settings
        # This data dir's server id, where servers share the store: tasks record which server holds
        # their attachments and output, as each keeps task files in its own data dir.
        self.server = server
        self.store = store
        self.models = models
        self.inference = inference
        self.sandbox = sandbox if sandbox is not None else Sandbox(hidden=_hidden_paths(settings))
        self.forwarder: InferenceForwarder = local_forwarder(settings, store)
        self.root = settings.data_dir / "tasks"
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._running: dict[str, _Running] = {}
        self._running_lock = threading.Lock()
        self._remote: dict[str, RemoteRun] = {}
        self._remote_lock = threading.Lock()
        # Called (from any thread) when a task a node may take is queued: the cluster wakes its nodes.
        self.on_queued: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._started = threading.Event()

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
        """What the task printed on ``stream`` so far (empty before it started); TaskElsewhere when
        another server sharing the store ran it (its output is in that server's data dir)."""
        task = self.store.get_task(task_id)
        if task is not None and task.ran_on is not None and task.ran_on != self.server:
            self._raise_elsewhere(task)
        try:
            return (self.task_dir(task_id) / stream).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _raise_elsewhere(self, task: Task) -> NoReturn:
        found = next((server for server in self.store.list_servers() if server.id == task.ran_on), None)
        where = f"server {task.ran_on} ({found.url})" if found is not None else f"server {task.ran_on}"
        raise TaskElsewhere(
            f"task {task.id} ran on {where}, which shares this database: its output is in that"
            " server's data dir",
            hint=f"read it from {found.url if found is not None else 'that server'}",
        )

    # -- creating, reading, cancelling ----------------------------------------------------------

    def create(
        self, request: NewTask, attachments: Sequence[Attachment], context: Context
    ) -> tuple[Task, bool]:
        """Queue a task (its attachments in its work dir); returns it and whether it is new. The
        same idempotency key from the same actor gives back the first task, and writes nothing."""
        limits = self._limits(request.limits)
        tools = self._tools(request, context.who)
        self._check(request, attachments)
        # Kept with the limits: like them, they bound what the job may reach.
        limits[INFERENCE_OPTION] = request.inference
        limits[TOOLS_OPTION] = tools
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
                        attachments_on=self.server if attachments else None,
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

    def _tools(self, request: NewTask, who: Actor) -> list[str]:
        """The tools the task's job is granted, sorted: each one known, and each one its creator
        may call (a task's own job may grant only tools it was granted itself)."""
        if not request.tools:
            return []
        if request.mode == "prompt":
            raise InvalidInput(
                "tools are for script and commands tasks: a prompt task runs no job to call them",
                hint="leave tools out of a prompt task",
            )
        unknown = sorted(set(request.tools) - set(TOOL_NAMES))
        if unknown:
            raise InvalidInput(
                f"no MCP tool is named {', '.join(map(repr, unknown))}",
                hint=f"grant any of {', '.join(TOOL_NAMES)} (`appliance mcp tools` lists them)",
            )
        tools = sorted(set(request.tools))
        if who.kind == "task":
            creator = self.store.get_task(who.id)
            held = granted_tools(creator) if creator is not None else frozenset()
            beyond = [tool for tool in tools if tool not in held]
            if beyond:
                raise Forbidden(
                    f"task {who.id} may not grant {', '.join(beyond)}: a task's job grants only tools"
                    " it was granted itself",
                    hint=f"grant only {', '.join(sorted(held))}" if held else "grant no tools",
                )
        elif self.settings.auth_enabled:  # a job's own grant was its creator's to give
            pulls = PreferenceService(self.settings, self.store).effective(ALLOWED_ROLES)
            for tool in tools:
                action = TOOL_ACTIONS[tool]
                granted = pulls if action == "models.pull" else ()
                decision = decide(who, action, Resource(granted_roles=granted))
                if isinstance(decision, Deny):
                    raise Forbidden(
                        f"{who.label} may not grant the tool {tool}: {decision.reason}",
                        hint="grant only tools you may call yourself, or ask an admin to create the task",
                    )
        return tools

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
            try:
                self.models.get(request.model)  # ModelNotFound, InvalidModelName
            except ModelNotFound:
                if self.inference is None:
                    raise
                self.inference.routable(request.model)  # an allowed provider's, else the refusal
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
        feed = self.store.change_feed()
        seen = feed.current("tasks")
        task = await asyncio.to_thread(self.get, task_id, who)
        read = time.monotonic()
        yield TaskEvent("state", TaskOut.of(task).model_dump(mode="json"))
        while True:
            live = self._live(task_id)
            if live is not None:
                async for event in live.follow():
                    yield event
                return
            if task.state in FINISHED_TASK_STATES:
                # Output another server holds is read there (``output`` says where); the end is shown.
                here = task.ran_on is None or task.ran_on == self.server
                for stream in ("stdout", "stderr") if here else ():
                    text = await asyncio.to_thread(self.output, task_id, stream)
                    if text:
                        yield TaskEvent("output", {"stream": stream, "text": text})
                yield TaskEvent("end", TaskOut.of(task).model_dump(mode="json"))
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            if feed.current("tasks") == seen and time.monotonic() - read < FOLLOW_REREAD_SECONDS:
                continue
            seen, read = feed.current("tasks"), time.monotonic()
            before, task = task.state, await asyncio.to_thread(self.get, task_id, who)
            if task.state != before and self._live(task_id) is None:
                yield TaskEvent("state", TaskOut.of(task).model_dump(mode="json"))

    # -- the queue --------------------------------------------------------------------------

    def start(self) -> None:
        """Run the queue on a thread of its own until ``close``."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="tasks", daemon=True)
        self._thread.start()
        self._started.wait()
        threading.Thread(target=self._watch_tasks, name="tasks-feed", daemon=True).start()

    def close(self) -> None:
        """Stop the queue: tasks still running are stopped and queued again (or failed) as after a crash."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        self._closing.set()
        with suppress(RuntimeError):  # its loop has already ended
            loop.call_soon_threadsafe(stopping.set)
        thread.join()  # the feed's watcher ends at its next wake, which closing the store hastens

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def _watch_tasks(self) -> None:
        """Wake the queue whenever the tasks' change counter moves: a task queued on another server
        sharing the store (PostgreSQL) is claimed here at once, not at the next POLL_SECONDS."""
        feed = self.store.change_feed()
        seen = feed.current("tasks")
        while not self._closing.is_set():
            now = feed.wait("tasks", seen, POLL_SECONDS)  # a feed reconnects itself; it never raises
            if now != seen:
                seen = now
                self._poke()

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
                        lease_expires_at=now_plus(self.lease_seconds),
                        modes=("prompt",) if self.settings.tasks.where == "workers" else (),
                        server=self.server,
                    )
                    if task is None:
                        break
                    # A retry of a task a node ran keeps that task's followers.
                    with self._remote_lock:
                        remote = self._remote.pop(task.id, None)
                    self._running[task.id] = _Running(live=remote.live if remote else Live())
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
                    task_id, only_from=("running",), lease_expires_at=now_plus(self.lease_seconds)
                )
            except TaskFinished:
                self._stop_here(task_id, "cancel")
            except ApplianceError as exc:  # the store failed: the next round tries again
                log.warning("could not renew the lease of task %s: %s", task_id, exc)

    # -- running one task -------------------------------------------------------------------

    async def _execute(self, task: Task) -> None:
        running = self._running[task.id]
        context = Context(Actor.from_label(task.actor), correlation_id=task.id)
        running.live.publish(TaskEvent("state", TaskOut.of(task).model_dump(mode="json")))
        await asyncio.to_thread(audit_start, self.store, context, task)
        task_dir = self.task_dir(task.id)
        if not task_dir.exists():  # queued by another server sharing the store: its files are there
            await asyncio.to_thread(self._make_task_dir, task.id)
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

    def _live(self, task_id: str) -> Live | None:
        """The followers' feed of a task running now, here or on a node."""
        running = self._running.get(task_id)
        if running is not None:
            return running.live
        return self._remote_live(task_id)

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
        access = JobAccess(
            run_id=str(task.attempts), inference=has_inference(task), tools=bool(granted_tools(task))
        )
        async with AsyncExitStack() as stack:
            socket = (
                await stack.enter_async_context(self.forwarder.serving(task.id, access))
                if access.routes()
                else None
            )
            job = Job(
                mode=task.mode,
                text=task.text,
                work_dir=self.task_dir(task.id) / "work",
                limits=Limits(**job_limits(task)),
                env=access.env(task.id),
                inference_socket=socket,
                inference=access.inference,
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
        limits = Limits(**job_limits(task))
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
                context=Context(task_actor(task.id), correlation_id=task.id),
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


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _may_see(who: Actor, task: Task) -> bool:
    return who.role not in ("user", "node") or task.actor == who.label


def _hidden_paths(settings: Settings) -> list[Path]:
    """The config file, which a job would otherwise see when it sits in /etc (the data dir it never sees)."""
    config_file = type(settings).model_config.get("toml_file")
    return [Path(config_file)] if isinstance(config_file, str | Path) else []
