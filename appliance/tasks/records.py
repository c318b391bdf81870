"""A task as the API shows it, what its followers get, and the small rules both sides of a lease share.

Imports: the store's records, audit, identity and the bridge.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel

from appliance.audit import Context, audited
from appliance.bridge import LoopInbox
from appliance.store.base import Store, Task

__all__ = [
    "INFERENCE_OPTION",
    "TOOLS_OPTION",
    "Live",
    "TaskEvent",
    "TaskOut",
    "audit_start",
    "granted_tools",
    "has_inference",
    "job_limits",
    "now_plus",
]

INFERENCE_OPTION = "inference"  # in a task's stored limits: whether its job may call models
TOOLS_OPTION = "tools"  # in a task's stored limits: the MCP tools its job was granted (names)


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
    tools: list[str]
    result: dict[str, Any] | None
    idempotency_key: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        options = ("inference", "tools")
        fields = {name: getattr(task, name) for name in cls.model_fields if name not in options}
        fields["limits"] = job_limits(task)
        return cls(**fields, inference=has_inference(task), tools=sorted(granted_tools(task)))


@dataclass(frozen=True)
class TaskEvent:
    """What a follower gets: ``state`` (the task, as TaskOut's JSON), ``output`` (``stream`` and
    ``text``), then one ``end`` (the task as it ended)."""

    kind: Literal["state", "output", "end"]
    data: dict[str, Any]


class Live:
    """A running task's events so far, handed to its followers on any event loop."""

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


def now_plus(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit_start(store: Store, context: Context, task: Task, *, node: str | None = None) -> None:
    with audited(store, context, action="task.start", target=task.id) as note:
        note.detail.update(mode=task.mode, attempt=task.attempts)
        if node is not None:
            note.detail.update(node=node)


def has_inference(task: Task) -> bool:
    return bool(task.limits.get(INFERENCE_OPTION, False))


def granted_tools(task: Task) -> frozenset[str]:
    """The MCP tools the task's job may call (none unless granted at create)."""
    return frozenset(task.limits.get(TOOLS_OPTION, ()))


def job_limits(task: Task) -> dict[str, Any]:
    """The task's ``Limits`` fields: its limits without the options kept beside them."""
    options = (INFERENCE_OPTION, TOOLS_OPTION)
    return {name: value for name, value in task.limits.items() if name not in options}
