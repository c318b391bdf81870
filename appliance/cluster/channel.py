"""The work channel: work for a node waits here until the node's long-poll takes it, and the
node's answer streams back through here to whoever submitted it.

One per server process, on its event loop (nothing here is thread-safe; call it from the loop).
The worker opens every connection: it polls (``poll``), and answers each item with a streaming
POST whose lines ``accept`` hands to the waiting ``Work`` as they arrive.

A work item's life::

    queued ──poll──► leased ──answer begins──► running ──finished line──► done
       │                │                         │
       └── cancel ──────┴─────────────────────────┴──► cancelled   (the client went away)
       └── lease over, node lost or removed ─────────► failed      (the waiter gets NotReady)

A lease runs from the submission, and again from the hand-out: work not answered within
``lease`` seconds of either fails, naming the node. Completion is idempotent: a second answer to
done work is told so, an answer to cancelled work is told to stop, and one from a node that does
not hold the lease gets LeaseLost (409).

``watch_nodes`` is the sweep the server runs beside it: a node that missed its heartbeats has its
work failed, a node removed too, and a node whose configuration changed is woken to fetch it.

Imports: errors, metrics, and this package's service (for the sweep).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio.to_thread

from appliance.cluster.service import ClusterService, Node
from appliance.errors import ApplianceError, InvalidInput, LeaseLost, NotReady
from appliance.metrics import Metrics

__all__ = ["MAX_LINE_BYTES", "Work", "WorkChannel", "watch_nodes"]

log = logging.getLogger(__name__)

WorkState = Literal["queued", "leased", "running", "done", "cancelled", "failed"]
_ENDED: tuple[WorkState, ...] = ("done", "cancelled", "failed")
_REMEMBERED = 10_000  # ended work kept to answer a repeated answer (idempotent completion)
_FINAL_TYPES = ("finished", "embeddings")  # a line of these types ends an answer
MAX_LINE_BYTES = 256 * 1024 * 1024  # one line: a generation's event, or a batch's embeddings


class _End:
    """Put in a work's queue after its last line."""


@dataclass(eq=False)
class Work:
    """One item submitted to a node; ``events()`` yields the node's answer, line by line."""

    id: str
    node_id: str
    item: dict[str, Any]
    state: WorkState = "queued"
    _lines: asyncio.Queue[dict[str, Any] | ApplianceError | _End] = field(default_factory=asyncio.Queue)
    _timer: asyncio.TimerHandle | None = None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The worker's decoded JSON lines as they arrive; NotReady when the node dies, is
        removed, or does not start within its lease. Ends after the final line (or a cancel)."""
        while True:
            got = await self._lines.get()
            if isinstance(got, _End):
                return
            if isinstance(got, ApplianceError):
                raise got
            yield got


@dataclass(eq=False)
class _Mailbox:
    """What waits for one node's next poll: work, and wake-ups (config, cancel)."""

    items: deque[dict[str, Any]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class WorkChannel:
    def __init__(self, *, lease: float = 30.0) -> None:
        self.lease = lease
        self._works: dict[str, Work] = {}
        self._ended: OrderedDict[str, tuple[str, WorkState]] = OrderedDict()  # id -> (node, state)
        self._mailboxes: dict[str, _Mailbox] = {}
        self._announced: dict[str, str] = {}  # node -> the config_version it was last woken for
        self._stopping = False
        self._names: dict[str, str] = {}  # node id -> name, for messages a client reads

    # -- the server's side -------------------------------------------------------------------------

    def submit(self, node_id: str, item: dict[str, Any], *, name: str | None = None) -> Work:
        """Queue ``item`` (``kind`` and its fields) for ``node_id`` (called ``name`` in errors); the
        channel adds ``id`` and ``lease_seconds``."""
        if name is not None:
            self._names[node_id] = name
        work_id = "w" + secrets.token_hex(8)
        work = Work(work_id, node_id, {**item, "id": work_id, "lease_seconds": self.lease})
        self._works[work_id] = work
        self._mailbox(node_id).items.append(work.item)
        self._mailbox(node_id).arrived.set()
        self._arm(work, "did not take it")
        return work

    def cancel(self, work_id: str) -> None:
        """The client went away: end the stream, and tell the node to stop if it has the work."""
        work = self._works.get(work_id)
        if work is None:
            return
        if work.state == "queued":
            box = self._mailbox(work.node_id)
            box.items = deque(item for item in box.items if item.get("id") != work_id)
        else:
            self._post(work.node_id, {"id": "w" + secrets.token_hex(8), "kind": "cancel", "work": work_id})
        self._end(work, "cancelled", _End())

    def announce_config(self, node_id: str, version: str) -> None:
        """Wake the node to fetch a newer config (once per version)."""
        if self._announced.get(node_id) == version:
            return
        self._announced[node_id] = version
        box = self._mailbox(node_id)
        if not any(item.get("kind") == "config" for item in box.items):
            self._post(node_id, {"id": "w" + secrets.token_hex(8), "kind": "config"})

    def announce_tasks(self, node_id: str) -> None:
        """Wake the node to claim a task that was queued (one wake-up waits at most)."""
        box = self._mailbox(node_id)
        if not any(item.get("kind") == "tasks" for item in box.items):
            self._post(node_id, {"id": "w" + secrets.token_hex(8), "kind": "tasks"})

    def name(self, node_id: str) -> str:
        """The node's name as the work submitted to it gave it, else its id."""
        return self._names.get(node_id, node_id)

    def stop(self) -> None:
        """The server is stopping: every long-poll answers now, with nothing, and so does every
        later one, so that the server need not wait out the workers' polls to exit."""
        self._stopping = True
        for box in self._mailboxes.values():
            box.arrived.set()

    def node_lost(self, node_id: str, reason: str) -> None:
        """Fail everything queued or leased on the node; the waiters get NotReady(reason)."""
        for work in [w for w in self._works.values() if w.node_id == node_id]:
            self._end(work, "failed", NotReady(reason, hint="retry: the request goes to another node"))
        # Emptied, not dropped: a poll of the node may be waiting on it (a node that comes back).
        self._mailbox(node_id).items.clear()
        self._announced.pop(node_id, None)

    def load(self, node_id: str) -> int:
        """Work in flight on the node: queued, leased or running."""
        return sum(1 for work in self._works.values() if work.node_id == node_id)

    def nodes_with_work(self) -> set[str]:
        return {work.node_id for work in self._works.values()}

    # -- the worker's side -------------------------------------------------------------------------

    async def poll(self, node_id: str, wait: float) -> list[dict[str, Any]]:
        """What waits for the node, as soon as there is any, else [] after ``wait`` seconds.
        Work handed out is leased to the node from now."""
        box = self._mailbox(node_id)
        try:
            async with asyncio.timeout(wait):
                while not box.items and not self._stopping:
                    box.arrived.clear()
                    await box.arrived.wait()
        except TimeoutError:
            return []
        if self._stopping:
            return []
        items = list(box.items)
        box.items.clear()
        for item in items:
            work = self._works.get(str(item.get("id")))
            if work is not None and work.state == "queued":
                work.state = "leased"
                self._arm(work, "did not start it")
        return items

    async def accept(self, node_id: str, work_id: str, lines: AsyncIterator[bytes]) -> dict[str, Any]:
        """Hand each line of the node's answer to the waiter as it arrives (route 4's body)."""
        work = self._works.get(work_id)
        if work is None or work.node_id != node_id:
            ended = self._ended.get(work_id)
            if ended is not None and ended[0] == node_id and ended[1] == "done":
                return {"state": "done", "duplicate": True}
            if ended is not None and ended[0] == node_id and ended[1] == "cancelled":
                return {"state": "cancelled"}
            raise LeaseLost(f"work {work_id} is not leased to this node")
        if work.state == "running":
            raise LeaseLost(f"work {work_id} is being answered already")
        work.state = "running"
        self._disarm(work)
        try:
            async for line in _lines_of(lines):
                if work.state != "running":  # cancelled (or failed) while it streamed
                    return {"state": work.state}
                try:
                    data = json.loads(line)
                except ValueError as exc:
                    raise InvalidInput(f"line of work {work_id} is not JSON: {exc}") from exc
                if not isinstance(data, dict):
                    raise InvalidInput(f"line of work {work_id} is not a JSON object")
                work._lines.put_nowait(data)
                if data.get("type") in _FINAL_TYPES:
                    self._end(work, "done", _End())
                    return {"state": "done"}
        except BaseException as exc:
            if work.state == "running":
                reason = exc.message if isinstance(exc, ApplianceError) else "its connection ended"
                self._end(work, "failed", NotReady(f"node {self.name(node_id)}'s answer broke off: {reason}"))
            raise
        if work.state != "running":
            return {"state": work.state}
        self._end(work, "failed", NotReady(f"node {self.name(node_id)}'s answer ended before it finished"))
        raise InvalidInput(f"the answer to work {work_id} ended without a finished line")

    # -- inside ------------------------------------------------------------------------------------

    def _mailbox(self, node_id: str) -> _Mailbox:
        box = self._mailboxes.get(node_id)
        if box is None:
            box = self._mailboxes[node_id] = _Mailbox()
        return box

    def _post(self, node_id: str, item: dict[str, Any]) -> None:
        box = self._mailbox(node_id)
        box.items.append(item)
        box.arrived.set()

    def _arm(self, work: Work, what: str) -> None:
        self._disarm(work)
        loop = asyncio.get_running_loop()
        work._timer = loop.call_later(self.lease, self._expire, work, what)

    def _disarm(self, work: Work) -> None:
        if work._timer is not None:
            work._timer.cancel()
            work._timer = None

    def _expire(self, work: Work, what: str) -> None:
        if work.state in ("queued", "leased"):
            if work.state == "queued":
                box = self._mailbox(work.node_id)
                box.items = deque(item for item in box.items if item.get("id") != work.id)
            message = f"node {self.name(work.node_id)} {what} within its lease of {self.lease:g} s"
            self._end(work, "failed", NotReady(message, hint="retry: the request goes to another node"))

    def _end(self, work: Work, state: WorkState, last: ApplianceError | _End) -> None:
        if work.state in _ENDED:
            return
        self._disarm(work)
        work.state = state
        work._lines.put_nowait(last)
        self._works.pop(work.id, None)
        self._ended[work.id] = (work.node_id, state)
        while len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)


async def _lines_of(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Whole lines (without their newline) of a byte stream, each as soon as it is complete."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
        if len(pending) > MAX_LINE_BYTES:  # the body is not capped as a whole; each line is
            raise InvalidInput(f"a line of the answer is longer than {MAX_LINE_BYTES} bytes")
    if pending.strip():
        yield pending


async def watch_nodes(
    cluster: ClusterService, channel: WorkChannel, *, every: float, metrics: Metrics | None = None
) -> None:
    """Until cancelled: fail the work of nodes that missed their heartbeats or were removed (also
    by ``appliance nodes rm``), wake nodes whose config changed (also by ``appliance nodes
    load``), and set the nodes' gauges, every ``every`` seconds."""
    unavailable: set[str] = set()  # the nodes found silent, so each is logged once
    while True:
        await asyncio.sleep(every)
        try:
            nodes = await anyio.to_thread.run_sync(cluster.nodes)
        except ApplianceError as exc:
            log.warning("cannot read the nodes: %s", exc)
            continue
        try:
            _sweep(cluster, channel, nodes, unavailable)
            if metrics is not None:
                _measure(metrics, cluster, channel, nodes)
        except Exception:  # a bug here must not end the sweep for the life of the server
            log.exception("the sweep of the nodes failed")


def _sweep(cluster: ClusterService, channel: WorkChannel, nodes: list[Node], unavailable: set[str]) -> None:
    known = {node.id for node in nodes}
    for node_id in channel.nodes_with_work() - known:
        channel.node_lost(node_id, f"node {channel.name(node_id)} was removed")
    for node in nodes:
        if cluster.state(node) == "unavailable":
            if node.id not in unavailable and node.last_heartbeat_at is not None:
                log.warning("node %s (%s) missed its heartbeats: no new work goes there", node.name, node.id)
            unavailable.add(node.id)
            channel.node_lost(node.id, f"node {node.name} missed its heartbeats")
            continue
        unavailable.discard(node.id)
        if node.config_version != node.config_applied:
            channel.announce_config(node.id, node.config_version)
    unavailable &= known


def _measure(metrics: Metrics, cluster: ClusterService, channel: WorkChannel, nodes: list[Node]) -> None:
    states = [cluster.state(node) for node in nodes]
    for state in ("ready", "draining", "unavailable"):
        metrics.nodes.labels(state=state).set(states.count(state))
    metrics.node_work.clear()  # removed nodes leave the gauge
    for node in nodes:
        metrics.node_work.labels(node=node.name).set(channel.load(node.id))
